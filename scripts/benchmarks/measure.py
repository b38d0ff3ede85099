"""Take the measurements: the smtplib baseline, the job end to end, loading, a profile."""

from __future__ import annotations

import contextlib
import csv
import os
import secrets
import smtplib
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pika
import pika.exceptions

from batch.broker import Broker
from batch.loader import Loader
from batch.message import Composer, Template
from batch.recipients import RecipientList
from batch.sentlog import SentLog
from batch.source import read_rows

from .common import BenchError, say, time_limit
from .lists import recipient_address, recipient_name, write_csv, write_xlsx
from .profiling import Profile
from .results import Figure, Row, make_row
from .settings import (
    ATTACHMENT_BYTES,
    FIXED_TEMPLATE,
    HTML_TEMPLATE,
    MEMORY_BASELINE_SIZE,
    PACED_DURATION_S,
    PACED_SHARE,
    PERSONAL_TEMPLATE,
    PROFILE_DURATION_S,
    RETRY_DELAYS_S,
    SMTP_TIMEOUT_S,
    WORKERS,
    job_timeout_s,
)
from .watch import JobRun, JobWatch


class Bench:
    """The measurements of one invocation, sharing a relay, a broker and a scratch folder."""

    def __init__(self, tmp: Path, amqp_url: str, sink_port: int) -> None:
        self.tmp = tmp
        self.amqp_url = amqp_url
        self.sink_port = sink_port
        self.last_sending_rate = 0.0  # of the last job run, from its sent-log's timestamps

    def measure(self, sizes: list[int]) -> list[Row]:
        """Take every measurement at every size; each ratio's two sides are taken together."""
        say(f"memory baseline: the job with {MEMORY_BASELINE_SIZE} recipients")
        small, memory_base = self._memory_baseline()
        startup = Figure("job, wall clock (start-up and stop)", small.wall_s, "s", ".1f")
        rows = [make_row(MEMORY_BASELINE_SIZE, startup)]
        for position, n in enumerate(sizes):
            rows += self._size(n, memory_base, with_fixed=position == 0)
        return rows

    def measure_memory(self, sizes: list[int]) -> list[Row]:
        """Take only the memory figures: the job's peak RSS at each size against a small run."""
        _, memory_base = self._memory_baseline()
        rows = []
        for n in sizes:
            _, job_rows = self._job(n, memory_base)
            rows += job_rows
        return rows

    def _memory_baseline(self) -> tuple[JobRun, Figure]:
        """Run the job on a small list: its peak RSS is what larger runs are compared with."""
        small = self.run_job(MEMORY_BASELINE_SIZE, PERSONAL_TEMPLATE)
        return small, Figure(f"job, {MEMORY_BASELINE_SIZE} recipients", small.peak_rss_mb, "MB")

    def _size(self, n: int, memory_base: Figure, *, with_fixed: bool) -> list[Row]:
        """Baseline, job, fixed template (optional) and loading at one size."""
        base = Figure("smtplib baseline", self.baseline_rate(n), "msg/s")
        rows = [make_row(n, base)]

        sent, job_rows = self._job(n, memory_base, against=base)
        rows += job_rows
        if with_fixed:
            fixed = Figure("job, fixed template", self.run_job(n, FIXED_TEMPLATE).rate, "msg/s")
            rows.append(make_row(n, fixed, base))
            rows.append(make_row(n, sent, fixed, title="personalised / fixed (target >= 0.80)"))
            rows += self._message_parts(n, sent)
            rows += self._paced(sent)

        for kind in ("csv", "xlsx"):
            loaded = Figure(f"load alone, {kind}", self.load_rate(n, kind), "rcpt/s")
            rows.append(make_row(n, loaded, sent))
        return rows

    def _job(
        self, n: int, memory_base: Figure, against: Figure | None = None
    ) -> tuple[Figure, list[Row]]:
        """Run the personalised job: its rate (against a baseline if given) and its peak RSS."""
        job = self.run_job(n, PERSONAL_TEMPLATE)
        sent = Figure("job, personalised", job.rate, "msg/s")
        peak = Figure("job, peak RSS", job.peak_rss_mb, "MB")
        return sent, [make_row(n, sent, against), make_row(n, peak, memory_base)]

    # 1. The baseline.

    def baseline_rate(self, n: int) -> float:
        """Send n pre-built messages over one smtplib session; return messages per second."""
        say(f"baseline: smtplib sends {n:,} messages to smtp-sink over one session")
        fields = {"email": recipient_address(1), "name": recipient_name(1)}
        letter = Composer(Template(PERSONAL_TEMPLATE), "bench").compose(fields["email"], fields)
        recipients = [recipient_address(i) for i in range(1, n + 1)]

        with time_limit(job_timeout_s(n), "the smtplib baseline"):
            try:
                with smtplib.SMTP("127.0.0.1", self.sink_port, timeout=SMTP_TIMEOUT_S) as smtp:
                    smtp.ehlo()
                    started = time.perf_counter()
                    for recipient in recipients:
                        smtp.sendmail(letter.sender, [recipient], letter.data)
                    elapsed = time.perf_counter() - started
            except (smtplib.SMTPException, OSError) as error:
                raise BenchError(f"smtplib baseline: {error}") from None
        rate = n / elapsed
        say(f"baseline: {rate:,.0f} msg/s ({len(letter.data):,} bytes a message)")
        return rate

    def _message_parts(self, n: int, sent: Figure) -> list[Row]:
        """Run the job with an HTML alternative and an attachment, against plain text."""
        job = self.run_job(n, PERSONAL_TEMPLATE, html=HTML_TEMPLATE, attachment=ATTACHMENT_BYTES)
        title = f"job, text + HTML + {ATTACHMENT_BYTES // 1000} KB attachment"
        return [make_row(n, Figure(title, job.rate, "msg/s"), sent)]

    def _paced(self, sent: Figure) -> list[Row]:
        """Run the job with --rate at a share of its unlimited rate; compare what it kept."""
        asked = max(1, round(sent.value * PACED_SHARE))
        n = max(100, round(asked * PACED_DURATION_S))
        self.run_job(n, PERSONAL_TEMPLATE, options={"--rate": f"{asked}/s"})
        kept = Figure(f"job, --rate {asked}/s", self.last_sending_rate, "msg/s")
        return [make_row(n, kept, Figure("the rate asked", asked, "msg/s"))]

    # 2 and 3. The job end to end.

    def run_job(
        self,
        n: int,
        template: str,
        profile_to: Path | None = None,
        *,
        html: str | None = None,
        attachment: int = 0,
        options: dict[str, str] | None = None,
    ) -> JobRun:
        """Run batch.run on a fresh list of n recipients; time it and sample its memory.

        html adds an HTML alternative, attachment a file of that many random bytes, and
        options more flags; the sending rate the sent-log shows is kept in last_sending_rate.
        """
        campaign, folder = self._new_campaign("bench")
        source, template_path = folder / "list.csv", folder / "template.txt"
        write_csv(source, n)
        template_path.write_text(template, encoding="utf-8")
        kind = "personalised" if "{{" in template else "fixed"
        say(f"job: {n:,} recipients, {kind} template, {WORKERS} workers, campaign {campaign}")

        flags = {
            "--source": source, "--template": template_path, "--campaign": campaign,
            "--state-dir": self.tmp, "--smtp-host": "127.0.0.1", "--smtp-port": self.sink_port,
            "--smtp-tls": "none", "--workers": WORKERS, "--amqp-url": self.amqp_url,
            **(options or {}),
        }  # fmt: skip
        if html is not None:
            template_path.with_suffix(".html").write_text(html, encoding="utf-8")
        if attachment:
            flags["--attach"] = folder / "attachment.pdf"
            flags["--attach"].write_bytes(os.urandom(attachment))
        command = [sys.executable, "-m", "batch.run", "-q"]
        for option, value in flags.items():
            command += [option, str(value)]
        with queues_deleted(self.amqp_url, campaign):
            run = JobWatch(command, folder, n, profile_to).run()
        self.last_sending_rate = check_sent(folder / "sent-log.csv", n)
        say(f"job: {run.rate:,.0f} msg/s ({run.wall_s:.1f} s), peak RSS {run.peak_rss_mb:,.0f} MB")
        return run

    # 4. Loading alone.

    def load_rate(self, n: int, kind: str) -> float:
        """Publish n recipients from a list with the project's loader; return recipients/s."""
        campaign, folder = self._new_campaign("bench-load")
        source = folder / f"list.{kind}"
        say(f"load: writing {n:,} recipients to {source.name}")
        (write_csv if kind == "csv" else write_xlsx)(source, n)

        say(f"load: publishing {n:,} recipients from {source.name}, no workers")
        broker = Broker(self.amqp_url, campaign, retry_delays_s=RETRY_DELAYS_S)
        ledger = SentLog(folder / "sent-log.csv", campaign, rebuild=True)
        recipients = RecipientList(read_rows(source), source=str(source))
        loader = Loader(recipients, broker, folder, ledger, publish_all=True, reconnect_for_s=30)
        with queues_deleted(self.amqp_url, campaign):
            try:
                with time_limit(job_timeout_s(n), f"loading {source.name}"):
                    broker.connect()
                    started = time.perf_counter()
                    loader.load()
                    elapsed = time.perf_counter() - started
            finally:
                broker.close()
                ledger.close()

        if loader.counts.published != n:
            raise BenchError(f"load: published {loader.counts.published:,} of {n:,} recipients")
        say(f"load: {n / elapsed:,.0f} recipients/s from {kind}")
        return n / elapsed

    # 5. Where a worker's time goes.

    def profile(self, n: int) -> Profile:
        """Run the job once more with py-spy on one worker; sum the samples by frame."""
        raw = self.tmp / "profile.txt"
        say(f"profile: a job of {n:,} recipients, py-spy on one worker for {PROFILE_DURATION_S} s")
        self.run_job(n, PERSONAL_TEMPLATE, profile_to=raw)
        return Profile.from_raw(raw)

    def _new_campaign(self, prefix: str) -> tuple[str, Path]:
        """Name a fresh campaign and make its folder in the scratch folder."""
        campaign = f"{prefix}-{secrets.token_hex(4)}"
        folder = self.tmp / campaign
        folder.mkdir()
        return campaign, folder


def check_sent(path: Path, n: int) -> float:
    """Refuse a run whose sent-log does not say `sent` for exactly n recipients.

    Return the rate between its first and its last `sent` line, in messages per second.
    """
    try:
        with path.open(newline="", encoding="utf-8") as file:
            times = [
                datetime.fromisoformat(row["timestamp"]).timestamp()
                for row in csv.DictReader(file)
                if row["status"] == "sent"
            ]
    except OSError as error:
        raise BenchError(f"job: cannot read the sent-log {path}: {error.strerror}") from None
    if len(times) != n:
        raise BenchError(f"job: the sent-log has {len(times):,} sent lines instead of {n:,}")
    span_s = max(times) - min(times)
    return (n - 1) / span_s if span_s > 0 else float("inf")


@contextlib.contextmanager
def queues_deleted(url: str, campaign: str) -> Iterator[None]:
    """Delete a campaign's queues when the block ends, quietly if it ends in an error."""
    try:
        yield
    except BaseException:
        delete_queues(url, campaign, quiet=True)
        raise
    delete_queues(url, campaign)


def delete_queues(url: str, campaign: str, *, quiet: bool = False) -> None:
    """Delete a campaign's queues: main, dead-letter and one per default retry delay.

    `quiet` (while another error is on its way) reports a failure instead of raising it.
    """
    queue = f"massmail.{campaign}"
    names = [queue, f"{queue}.dead", *(f"{queue}.retry.{round(s * 1000)}" for s in RETRY_DELAYS_S)]
    try:
        connection = pika.BlockingConnection(pika.URLParameters(url))
        try:
            channel = connection.channel()
            for name in names:
                channel.queue_delete(name)
        finally:
            connection.close()
    except pika.exceptions.AMQPError as error:
        problem = f"cannot delete the queues of {campaign}: {error!r}"
        if not quiet:
            raise BenchError(problem) from None
        print(f"bench: {problem}", file=sys.stderr)
