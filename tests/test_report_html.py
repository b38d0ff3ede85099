"""`python -m batch.report --html`: the report as a page, read in a real headless Chromium."""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from tests.conftest import (
    RUN_TIMEOUT_S,
    batch_in_background,
    people,
    wait_until,
    write_csv,
    write_template,
)
from tests.test_report import counts_in, report

CHROMIUM = Path("/usr/bin/chromium")
# As root, without a sandbox; and without the background connections a closed network refuses.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
BROWSER_TIMEOUT_MS = 30_000
# A campaign run, a report and a browser: generous, yet a hang still fails.
TEST_TIMEOUT_S = RUN_TIMEOUT_S + 60
WIDE, NARROW = 1280, 420  # viewport widths, in CSS pixels
MAX_BARS = 120
NO_SUCH_USER = (550, "5.1.1 no such user")
UNIT_S = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium, headless, driven by Playwright (which downloads no browser here)."""
    if not CHROMIUM.is_file():
        pytest.fail(
            f"{CHROMIUM} is missing: run the tests with ./scripts/test, which installs "
            "Debian's chromium package",
            pytrace=False,
        )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, timeout=BROWSER_TIMEOUT_MS
        )
        yield browser
        browser.close()


class Opened:
    """A report page open in the browser, and every request it made."""

    def __init__(self, browser: Browser, path: Path, width: int = WIDE) -> None:
        self.url = path.resolve().as_uri()
        self.page: Page = browser.new_page(viewport={"width": width, "height": 900})
        self.page.set_default_timeout(BROWSER_TIMEOUT_MS)
        self.requests: list[str] = []
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.page.goto(self.url)

    def counts(self) -> dict[str, str]:
        """Read the counts table as shown: each row's name and its number."""
        rows = self.page.locator("table.counts tr").all()
        return {
            row.locator("th").inner_text(): row.locator("td").first.inner_text() for row in rows
        }

    def listed(self, status: str) -> list[list[str]]:
        """Read the rows listed under a status: recipient, Message-ID, reply."""
        rows = self.page.locator(f"section#{status} tbody tr").all()
        return [row.locator("td").all_inner_texts() for row in rows]

    def bar_width_s(self) -> int:
        """Read how long a bar of the chart is, from the words above it."""
        words = self.page.locator("text=each bar is").inner_text()
        number, unit = re.search(r"each bar is (\d+) (second|minute|hour|day)", words).groups()
        return int(number) * UNIT_S[unit]

    def close(self) -> None:
        self.page.close()


def html_report(folder: Path, page: Path, *args: str) -> subprocess.CompletedProcess:
    """Write the campaign's report page; check the command ended well and printed the text."""
    result = report(str(folder), "--html", str(page), *args)
    assert result.returncode == 0, result.stderr
    assert f"the report as a page: {page}" in result.stdout
    return result


def settled_per_bar(sent_log: list[dict[str, str]], width_s: int) -> list[tuple[int, int]]:
    """Count sent, and failed or in-doubt, lines of each non-empty bar, oldest first."""
    bars: dict[int, Counter[str]] = {}
    for row in sent_log:
        if row["status"] in ("sent", "failed", "in-doubt"):
            second = int(datetime.fromisoformat(row["timestamp"]).timestamp())
            kind = "sent" if row["status"] == "sent" else "other"
            bars.setdefault(second // width_s, Counter())[kind] += 1
    return [(bars[start]["sent"], bars[start]["other"]) for start in sorted(bars)]


def drawn_bars(opened: Opened) -> list[tuple[int, int]]:
    """Read each drawn bar's numbers from its tooltip, left to right."""
    bars = opened.page.locator("svg.chart g.bar").all()
    lefts = [bar.bounding_box()["x"] for bar in bars]
    assert lefts == sorted(lefts)
    numbers = []
    for bar in bars:
        tip = bar.locator("title").text_content()
        sent, other = re.search(r"(\d+) sent, (\d+) failed or in doubt", tip).groups()
        numbers.append((int(sent), int(other)))
    return numbers


def assert_bars_visible_within(opened: Opened, width: int) -> None:
    """Every bar has some height, and the chart and its bars lie within the viewport."""
    chart = opened.page.locator("svg.chart").bounding_box()
    assert chart["x"] >= 0 and chart["x"] + chart["width"] <= width
    for bar in opened.page.locator("svg.chart g.bar").all():
        box = bar.bounding_box()
        assert box["height"] > 0.5, box
        assert chart["x"] <= box["x"] and box["x"] + box["width"] <= chart["x"] + chart["width"]


def finish_a_campaign(job, tmp_path: Path, size: int, **refused: tuple[int, str]) -> None:
    """Mail `size` people, the relay refusing some (person3=(550, "...")), to the end."""
    for name, reply in refused.items():
        job.relay.refuse[f"{name}@example.com"] = reply
    source = write_csv(tmp_path / "list.csv", people(size))
    result = job.run(source, write_template(tmp_path / "template.txt"), "--workers", "2")
    assert result.returncode == 1, result.stderr  # some recipients failed


@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_the_page_shows_the_counts_and_the_failed_recipients_of_a_finished_campaign(
    job, tmp_path, browser
):
    refused = {"person3": NO_SUCH_USER, "person11": NO_SUCH_USER, "person17": NO_SUCH_USER}
    doubtful = {"person5@example.com", "person8@example.com"}
    job.relay.drop_after_data = lambda message: bool(doubtful & set(message.rcpt_tos))
    finish_a_campaign(job, tmp_path, 30, **refused)
    before = datetime.now(UTC).replace(microsecond=0)

    text = html_report(job.folder, tmp_path / "report.html")
    opened = Opened(browser, tmp_path / "report.html")

    # The same numbers as the text report, which are the sent-log's.
    truth = Counter(job.final_statuses().values())
    assert truth == {"sent": 25, "failed": 3, "in-doubt": 2}
    shown = {name: int(number) for name, number in opened.counts().items() if number.isdigit()}
    assert shown == counts_in(text.stdout) == {"recipients": 30, **truth, "refused rows": 0}
    assert opened.page.locator("h1").inner_text() == f"campaign {job.campaign}"
    made = re.search(r"report made (\S+ \S+) UTC", opened.page.inner_text("body")).group(1)
    made_at = datetime.fromisoformat(made).replace(tzinfo=UTC)
    assert before <= made_at <= datetime.now(UTC)

    # The failed and in-doubt recipients with their Message-IDs and the relay's replies.
    last_lines = {row["recipient"]: row for row in job.sent_log()}
    failed = opened.listed("failed")
    assert {row[0] for row in failed} == {f"{name}@example.com" for name in refused}
    for recipient, message_id, reply in failed:
        assert message_id == last_lines[recipient]["message_id"] != ""
        assert reply == "550 5.1.1 no such user"
    relay_ids = {m.rcpt_tos[0]: m.message_id for m in job.relay.messages()}
    in_doubt = opened.listed("in-doubt")
    assert {recipient: message_id for recipient, message_id, _ in in_doubt} == {
        address: relay_ids[address] for address in doubtful
    }
    opened.close()

    # --show caps the lists as it caps the text report's, and says how many more there are.
    html_report(job.folder, tmp_path / "capped.html", "--show", "1")
    capped = Opened(browser, tmp_path / "capped.html")
    assert len(capped.listed("failed")) == len(capped.listed("in-doubt")) == 1
    assert "... and 2 more" in capped.page.locator("section#failed").inner_text()
    assert "... and 1 more" in capped.page.locator("section#in-doubt").inner_text()
    capped.close()


@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_the_chart_draws_one_visible_bar_for_each_stretch_of_time_messages_were_settled_in(
    job, tmp_path, browser
):
    # One worker and a slow relay spread the campaign over a few seconds, so over a few bars.
    job.relay.data_delay_s = 0.05
    refused = {f"person{n}": NO_SUCH_USER for n in (4, 20, 33, 47)}
    for name, reply in refused.items():
        job.relay.refuse[f"{name}@example.com"] = reply
    source = write_csv(tmp_path / "list.csv", people(60))
    result = job.run(source, write_template(tmp_path / "template.txt"), "--workers", "1")
    assert result.returncode == 1, result.stderr
    html_report(job.folder, tmp_path / "report.html")

    for width in (WIDE, NARROW):
        opened = Opened(browser, tmp_path / "report.html", width)

        # One bar per stretch of time with settled lines, each with the sent-log's numbers.
        expected = settled_per_bar(job.sent_log(), opened.bar_width_s())
        assert len(expected) >= 2, expected
        assert sum(sent for sent, _ in expected) == 56
        assert sum(other for _, other in expected) == 4
        assert drawn_bars(opened) == expected
        assert_bars_visible_within(opened, width)

        # Sent and failed parts of the bars have colours of their own; the axes say what.
        chart = opened.page.locator("svg.chart")
        fill = "element => getComputedStyle(element).fill"
        sent_fill = chart.locator("rect.sent").first.evaluate(fill)
        failed_fill = chart.locator("rect.failed-or-in-doubt").first.evaluate(fill)
        assert sent_fill != failed_fill
        assert chart.locator("rect.failed-or-in-doubt").count() >= 1
        labels = chart.locator("text").all_text_contents()
        assert "time (UTC)" in labels and "messages per minute" in labels
        assert any(re.fullmatch(r"\d\d:\d\d:\d\d", label) for label in labels), labels
        opened.close()


@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_a_hostile_reply_shows_as_text_runs_nothing_and_the_page_fetches_nothing(
    job, tmp_path, browser
):
    script = "<script>window.hacked=1</script>"
    image = '5.1.1 "><img src=x onerror="window.hacked=2">'
    finish_a_campaign(job, tmp_path, 10, person2=(550, script), person6=(550, image))

    html_report(job.folder, tmp_path / "report.html")
    opened = Opened(browser, tmp_path / "report.html")

    replies = {recipient: reply for recipient, _, reply in opened.listed("failed")}
    assert replies == {
        "person2@example.com": f"550 {script}",
        "person6@example.com": f"550 {image}",
    }
    assert opened.page.evaluate("typeof window.hacked") == "undefined"
    assert opened.page.locator("script, img, iframe, object, embed, link").count() == 0
    # The page alone, not even the image the reply names (file:///.../x): nothing else loads.
    assert opened.requests == [opened.url]
    opened.close()


@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_the_page_of_a_running_campaign_shows_the_recipients_still_queued(job, tmp_path, browser):
    source = write_csv(tmp_path / "list.csv", people(300))
    template = write_template(tmp_path / "template.txt")
    args = job.args(source, template, "--workers", "2")

    # The relay holds its answers after 30 messages: both workers wait, each with one claimed.
    with (
        job.relay.held_after(30) as hold,
        batch_in_background(args, tmp_path / "run.log") as process,
    ):
        wait_until(lambda: job.relay.count() == 32, "both workers wait for the relay", process)
        midway = html_report(job.folder, tmp_path / "midway.html")
        hold.release()
        assert process.wait(timeout=RUN_TIMEOUT_S) == 0

    opened = Opened(browser, tmp_path / "midway.html")
    shown = {name: int(number) for name, number in opened.counts().items() if number.isdigit()}
    assert shown == counts_in(midway.stdout)
    assert shown == {"recipients": 300, "sent": 30, "claimed": 2, "queued": 268, "refused rows": 0}
    assert sum(sent for sent, _ in drawn_bars(opened)) == 30
    opened.close()

    # Once the relay answers again, the run ends and the page has everyone sent.
    after = html_report(job.folder, tmp_path / "after.html")
    opened = Opened(browser, tmp_path / "after.html")
    shown = {name: int(number) for name, number in opened.counts().items() if number.isdigit()}
    assert shown == counts_in(after.stdout) == {"recipients": 300, "sent": 300, "refused rows": 0}
    assert sum(sent for sent, _ in drawn_bars(opened)) == 300 == job.relay.count()
    opened.close()


@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_a_long_campaigns_chart_keeps_to_120_bars_within_a_narrow_page(tmp_path, browser):
    folder = tmp_path / "state" / "long"
    folder.mkdir(parents=True)
    start = datetime(2026, 12, 3, 22, 0, tzinfo=UTC)  # five hours, past midnight
    lines = ["timestamp,campaign,recipient,status,smtp_code,smtp_reply,message_id,worker"]
    for n in range(2000):
        at = (start + timedelta(seconds=n * 9)).isoformat(timespec="milliseconds")
        status, reply = ("failed", "550 no") if n % 50 == 0 else ("sent", "250 ok")
        for step in ("claimed", status):
            lines.append(f"{at},long,p{n}@example.com,{step},,{reply},<{n}@x>,h:1")
    # Not counted: a deferred attempt. Counted, in a bar of its own: a late failure.
    lines.append(f"{at},long,late@example.com,deferred,451,451 later,<d@x>,h:1")
    at = (start + timedelta(hours=5, minutes=1)).isoformat(timespec="milliseconds")
    lines.append(f"{at},long,late@example.com,failed,550,550 no,<d@x>,h:1")
    (folder / "sent-log.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")

    html_report(folder, tmp_path / "long.html")
    opened = Opened(browser, tmp_path / "long.html", NARROW)

    # Five hours in two-minute bars would be 151: five-minute bars make 61.
    assert opened.bar_width_s() == 300
    rows = [dict(zip(lines[0].split(","), line.split(","), strict=True)) for line in lines[1:]]
    expected = settled_per_bar(rows, 300)
    assert len(expected) == 61 <= MAX_BARS
    assert expected[-1] == (0, 1)
    assert drawn_bars(opened) == expected
    assert_bars_visible_within(opened, NARROW)
    labels = opened.page.locator("svg.chart text").all_text_contents()
    # The bars cross midnight, so the times along the axis name their day.
    assert "12-03 22:00" in labels and any(label.startswith("12-04 ") for label in labels)
    opened.close()
