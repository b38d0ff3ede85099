"""The nightly wrappers in cron/, run as cron runs them: no terminal, a bare environment."""

from __future__ import annotations

import csv
import json
import os
import pwd
import re
import signal
import subprocess
import time
import uuid
import xml.etree.ElementTree as ElementTree
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path, PureWindowsPath

import pytest

from tests.conftest import (
    ROOT,
    RUN_TIMEOUT_S,
    delete_queues,
    people,
    received_counts,
    write_csv,
    write_template,
)
from tests.relay import RecordingRelay

CRON = ROOT / "cron"
WRAPPER = CRON / "massmail-nightly.sh"
CRONTAB = CRON / "crontab.example"
TASK_XML = CRON / "massmail-task.xml"
TASK_CMD = CRON / "massmail-nightly.cmd"
EXAMPLE_ROOT = "/opt/massmail"  # the project path crontab.example asks to change
TASK_NS = {"t": "http://schemas.microsoft.com/windows/2004/02/mit/task"}

RECIPIENTS = 200
SLOW_DATA_S = 0.04  # the relay's pause per message: a run of RECIPIENTS lasts about 8 s
STOP_AFTER = 20  # messages the relay takes before a test stops the run
WAIT_S = 60.0  # the longest a test waits for a running job to get somewhere

# The wrapper's own lines, and batch.run's: time, level, process.
WRAPPER_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d campaign=\S+ ")
JOB_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) +\[\S+ \d+\] "
)


# cron's surroundings for one test.


@dataclass
class Nightly:
    """The wrapper's config, log folder and environment in one test, and what it started."""

    home: Path  # where cron starts a job: the user's home, not the project
    config: Path
    log_dir: Path
    state_dir: Path
    source: Path
    amqp_url: str
    relay: RecordingRelay
    campaigns: set[str] = field(default_factory=set)
    processes: list[subprocess.Popen] = field(default_factory=list)

    def new_night(self) -> str:
        """Pick a date no other run on the shared broker uses, and remember its campaign."""
        night = (date(3000, 1, 1) + timedelta(days=uuid.uuid4().int % 2_000_000)).isoformat()
        self.campaigns.add(f"nightly-{night}")
        return night

    def environment(self, night: str | None, *, config: bool = True) -> dict[str, str]:
        """cron's bare environment, plus what the crontab sets for this test."""
        env = {
            "HOME": str(self.home),
            "LOGNAME": pwd.getpwuid(os.getuid()).pw_name,
            "PATH": "/usr/bin:/bin",
            "SHELL": "/bin/sh",
            "MASSMAIL_LOG_DIR": str(self.log_dir),
        }
        if config:
            env["MASSMAIL_CONFIG"] = str(self.config)
        if night is not None:
            env["MASSMAIL_DATE"] = night
        return env

    def start(self, night: str | None, argv: list[str] | None = None, **env_options):
        """Start crontab.example's job as cron does: `sh -c`, no terminal, in HOME."""
        process = subprocess.Popen(
            argv or ["/bin/sh", "-c", crontab_command()],
            cwd=self.home,
            env=self.environment(night, **env_options),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.processes.append(process)
        return process

    def run(self, night: str | None, **env_options) -> subprocess.CompletedProcess:
        """Run the nightly job to its end."""
        return finish(self.start(night, **env_options))

    def log_path(self, night: str) -> Path:
        return self.log_dir / f"massmail-{night}.log"

    def log(self, night: str) -> list[str]:
        return self.log_path(night).read_text(encoding="utf-8").splitlines()

    def final_statuses(self, night: str) -> dict[str, str]:
        """Each recipient's last status in that night's sent-log."""
        sent_log = self.state_dir / f"nightly-{night}" / "sent-log.csv"
        with sent_log.open(newline="", encoding="utf-8") as file:
            return {row["recipient"]: row["status"] for row in csv.DictReader(file)}


def crontab_command() -> str:
    """The command of crontab.example's job, with the project's real path."""
    [(_, command)] = crontab_jobs(CRONTAB.read_text(encoding="utf-8"))
    return command.replace(EXAMPLE_ROOT, str(ROOT))


def finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    """Wait for a started job and collect its output; a hang fails the test."""
    try:
        stdout, stderr = process.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"the nightly job did not end within {RUN_TIMEOUT_S} s: {stderr[-2000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def wait_for(condition: Callable[[], bool], what: str, process: subprocess.Popen) -> None:
    """Wait until condition holds while process runs; fail if it ends or WAIT_S go by."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the job ended with {process.returncode} before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {WAIT_S} s")
        time.sleep(0.05)


def write_config(path: Path, **settings: object) -> Path:
    """Write a batch.run TOML file with these settings."""
    lines = [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def nightly(tmp_path, amqp_url, relay):
    """A list, a template and a config for the wrapper; the broker and relay are real."""
    home = tmp_path / "home"
    home.mkdir()
    source = write_csv(tmp_path / "list.csv", people(RECIPIENTS))
    template = write_template(tmp_path / "template.txt")
    state_dir = tmp_path / "state"
    config = write_config(
        tmp_path / "massmail.toml",
        source=str(source),
        template=str(template),
        state_dir=str(state_dir),
        amqp_url=amqp_url,
        smtp_host=relay.host,
        smtp_port=relay.port,
        smtp_tls="none",
        workers=1,
    )
    setup = Nightly(home, config, tmp_path / "logs", state_dir, source, amqp_url, relay)
    yield setup

    for process in setup.processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    for campaign in setup.campaigns:
        delete_queues(amqp_url, campaign)


def everyone(times: int) -> Counter[str]:
    return Counter({person["email"]: times for person in people(RECIPIENTS)})


# A night under cron.


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_a_nightly_run_under_cron_sends_everyone_once_prints_nothing_and_logs_to_a_file(
    nightly,
):
    nightly.relay.data_delay_s = SLOW_DATA_S  # long enough for a progress line
    night = nightly.new_night()

    result = nightly.run(night)

    # Nothing printed: cron sends no mail.
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert received_counts(nightly.relay) == everyone(1)
    assert set(nightly.final_statuses(night).values()) == {"sent"}

    # The day's log: the wrapper's start line, batch.run's banner, progress and summary
    # (plain lines, no bar), then the exit code.
    log = nightly.log(night)
    assert all(WRAPPER_LINE.match(line) or JOB_LINE.match(line) for line in log), log
    assert log[0].endswith(f"campaign=nightly-{night} config={nightly.config} start")
    assert f"campaign nightly-{night}: list {nightly.source}, 1 workers" in log[1]
    assert any("progress: " in line for line in log), log
    assert f"{RECIPIENTS} sent, 0 failed, 0 in doubt, 0 waiting" in log[-2]
    assert log[-1].endswith(f"campaign=nightly-{night} exit=0")

    # Nothing written where cron started it, nor in the project's own logs/.
    assert list(nightly.home.iterdir()) == []
    assert not (ROOT / "logs" / f"massmail-{night}.log").exists()


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_a_recipient_refused_for_good_ends_with_1_and_one_line_for_cron_to_mail(nightly):
    refused = "person7@example.com"
    nightly.relay.refuse[refused] = (550, "5.1.1 no such user")
    night = nightly.new_night()

    result = nightly.run(night)

    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert f"campaign nightly-{night} ended with exit 1" in line
    assert str(nightly.log_path(night)) in line
    assert received_counts(nightly.relay) == everyone(1) - Counter({refused: 1})
    assert nightly.final_statuses(night)[refused] == "failed"
    assert nightly.log(night)[-1].endswith(f"campaign=nightly-{night} exit=1")


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_a_second_nightly_run_while_the_first_holds_the_lock_ends_with_3_and_says_so(nightly):
    nightly.relay.data_delay_s = SLOW_DATA_S
    first_night, next_night = nightly.new_night(), nightly.new_night()
    first = nightly.start(first_night)
    wait_for(lambda: nightly.relay.count() > 0, "the first message", first)

    # Another night's campaign, which batch.run's per-campaign lock would let through.
    second = nightly.run(next_night)

    assert second.returncode == 3, second.stderr
    assert second.stdout == ""
    [line] = second.stderr.splitlines()
    assert f"another nightly run is active; campaign nightly-{next_night} not started" in line
    assert not (nightly.state_dir / f"nightly-{next_night}").exists()
    assert "not started: another nightly run is active" in nightly.log(next_night)[-1]

    result = finish(first)
    assert (result.returncode, result.stderr) == (0, "")
    assert received_counts(nightly.relay) == everyone(1)


@pytest.mark.timeout(3 * RUN_TIMEOUT_S + 60)
def test_a_rerun_the_same_night_resumes_and_the_next_night_starts_a_new_campaign(nightly):
    nightly.relay.data_delay_s = SLOW_DATA_S
    night, next_night = nightly.new_night(), nightly.new_night()

    # Stopped midway, as a shutdown stops the whole process group. The wrapper itself is
    # started here, not `sh -c`, whose own death by the signal would hide its exit code.
    first = nightly.start(night, [str(WRAPPER)])
    wait_for(lambda: nightly.relay.count() >= STOP_AFTER, f"{STOP_AFTER} messages", first)
    os.killpg(first.pid, signal.SIGTERM)
    stopped = finish(first)

    assert stopped.returncode == 75, stopped.stderr
    [line] = stopped.stderr.splitlines()
    assert f"campaign nightly-{night} ended with exit 75" in line
    assert STOP_AFTER <= nightly.relay.count() < RECIPIENTS
    assert nightly.log(night)[-1].endswith(f"campaign=nightly-{night} exit=75")

    # The same night again: the same campaign goes on where it stopped.
    nightly.relay.data_delay_s = 0.0
    settled = sum(s in ("sent", "in-doubt") for s in nightly.final_statuses(night).values())
    rerun = nightly.run(night)

    assert (rerun.returncode, rerun.stdout, rerun.stderr) == (0, "", "")
    assert received_counts(nightly.relay) == everyone(1)
    resumed = f"resuming: {settled} recipients settled by earlier runs"
    assert any(line.endswith(resumed) for line in nightly.log(night)), resumed

    # The next night: a new campaign, and everyone gets its message.
    next_run = nightly.run(next_night)

    assert (next_run.returncode, next_run.stdout, next_run.stderr) == (0, "", "")
    assert received_counts(nightly.relay) == everyone(2)
    assert set(nightly.final_statuses(next_night).values()) == {"sent"}
    assert len(nightly.final_statuses(next_night)) == RECIPIENTS
    assert nightly.log(next_night)[-1].endswith(f"campaign=nightly-{next_night} exit=0")


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_without_settings_the_wrapper_reads_the_projects_config_and_names_tonight(nightly):
    # A template that does not exist stops batch.run before it connects to anything,
    # whatever config/massmail.toml holds.
    before = date.today().isoformat()
    process = nightly.start(
        None,
        [
            "/bin/sh",
            "-c",
            f"{crontab_command()} --source /nonexistent.csv --template /nonexistent",
        ],
        config=False,
    )
    result = finish(process)
    after = date.today().isoformat()

    assert result.returncode == 2, result.stderr
    [log_file] = [
        nightly.log_path(day) for day in {before, after} if nightly.log_path(day).exists()
    ]
    today = log_file.name.removeprefix("massmail-").removesuffix(".log")
    [line] = result.stderr.splitlines()
    assert f"campaign nightly-{today} ended with exit 2" in line
    start_line = log_file.read_text(encoding="utf-8").splitlines()[0]
    assert f"config={ROOT / 'config' / 'massmail.toml'} start" in start_line
    assert "/nonexistent" in log_file.read_text(encoding="utf-8")


@pytest.mark.timeout(60)
def test_a_date_that_does_not_exist_is_refused_with_2_before_anything_starts(nightly):
    result = nightly.run("2026-02-30")

    assert result.returncode == 2
    assert (
        result.stderr
        == "massmail-nightly: MASSMAIL_DATE=2026-02-30 is not a date such as 2026-12-03\n"
    )
    assert not nightly.log_dir.exists()


# The crontab line.

# crontab(5): each time field's range, and the names the month and the weekday accept.
MONTH_NAMES = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
MONTHS = {name: n for n, name in enumerate(MONTH_NAMES, 1)}
WEEKDAYS = {name: n for n, name in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))}
CRON_FIELDS = (
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day of month", 1, 31, {}),
    ("month", 1, 12, MONTHS),
    ("day of week", 0, 7, WEEKDAYS),
)
CRON_SETTING = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\s*=")


def crontab_jobs(text: str) -> list[tuple[list[str], str]]:
    """Read a crontab's jobs as (five time fields, command); raise ValueError on a bad line."""
    jobs = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#") or CRON_SETTING.match(line):
            continue
        parts = line.split(None, 5)
        if len(parts) < 6:
            raise ValueError(f"line {number}: not five time fields and a command: {line}")
        for (name, low, high, names), value in zip(CRON_FIELDS, parts, strict=False):
            if not valid_time_field(value, low, high, names):
                raise ValueError(f"line {number}: {value!r} is not a valid {name}")
        jobs.append((parts[:5], parts[5]))
    return jobs


def valid_time_field(value: str, low: int, high: int, names: dict[str, int]) -> bool:
    """Tell whether value is a crontab time field: *, N, N-M or names, with /STEP, in lists."""
    for item in value.split(","):
        span, slash, step = item.partition("/")
        if slash and not (step.isdigit() and int(step) > 0):
            return False
        if span == "*":
            continue
        ends = [int(end) if end.isdigit() else names.get(end.lower()) for end in span.split("-")]
        if not 1 <= len(ends) <= 2 or None in ends:
            return False
        if not all(low <= end <= high for end in ends) or ends != sorted(ends):
            return False
    return True


def test_the_crontab_example_is_valid_and_runs_the_wrapper_by_its_absolute_path():
    text = CRONTAB.read_text(encoding="utf-8")

    [(times, command)] = crontab_jobs(text)

    assert times == ["30", "2", "*", "*", "*"]
    assert command == f"{EXAMPLE_ROOT}/cron/massmail-nightly.sh"
    assert "%" not in command  # cron would cut the command there and feed the rest to stdin
    assert re.search(r"^MAILTO=\S+@\S+$", text, re.MULTILINE)
    # The optional retry, commented out, is a valid line once uncommented.
    retries = [line.lstrip("# ") for line in text.splitlines() if "massmail-nightly.sh" in line]
    assert len(crontab_jobs("\n".join(retries))) == 2
    # The reader refuses what cron would refuse.
    for bad in ("60 2 * * * x", "30 2 * * x", "30 2 0 * * x", "30 2 * 13 * x", "*/0 * * * * x"):
        with pytest.raises(ValueError):
            crontab_jobs(bad)


# The Windows files: read, since they cannot run here.


def test_the_task_scheduler_task_runs_the_cmd_wrapper_daily_at_the_crontabs_time():
    task = ElementTree.parse(TASK_XML).getroot()

    actions = task.findall("t:Actions/t:Exec", TASK_NS)
    [command] = [action.findtext("t:Command", namespaces=TASK_NS) for action in actions]
    wrapper = PureWindowsPath(command)
    assert wrapper.is_absolute() and wrapper.parts[-2:] == ("cron", "massmail-nightly.cmd")
    working_dir = task.findtext("t:Actions/t:Exec/t:WorkingDirectory", namespaces=TASK_NS)
    assert PureWindowsPath(working_dir) == wrapper.parent.parent

    trigger = task.find("t:Triggers/t:CalendarTrigger", TASK_NS)
    assert trigger.findtext("t:ScheduleByDay/t:DaysInterval", namespaces=TASK_NS) == "1"
    start = datetime.fromisoformat(trigger.findtext("t:StartBoundary", namespaces=TASK_NS))
    [(times, _)] = crontab_jobs(CRONTAB.read_text(encoding="utf-8"))
    assert (start.minute, start.hour) == (int(times[0]), int(times[1]))
    assert task.findtext("t:Settings/t:MultipleInstancesPolicy", namespaces=TASK_NS) == "IgnoreNew"


def test_the_cmd_wrapper_names_the_campaign_after_a_locale_free_date_and_returns_the_exit_code():
    raw = TASK_CMD.read_bytes()

    # cmd.exe finds labels reliably only in a file with CRLF line endings.
    assert raw.count(b"\n") == raw.count(b"\r\n") > 0
    lines = [line.strip() for line in raw.decode("ascii").split("\r\n")]
    code = [line for line in lines if line and not line.lower().startswith(("rem", "::"))]

    # The date: MASSMAIL_DATE, else PowerShell's fixed format; %DATE% follows the locale.
    assert not any("%date%" in line.lower() for line in code)
    assert 'set "TODAY=%MASSMAIL_DATE%"' in code
    [get_date] = [line for line in code if "Get-Date" in line]
    assert '"Get-Date -Format yyyy-MM-dd"' in get_date and get_date.endswith('set "TODAY=%%d"')
    assert 'if not defined CAMPAIGN set "CAMPAIGN=nightly-%TODAY%"' in code

    # batch.run gets the campaign and the caller's config; its exit code is the script's.
    [run_at] = [n for n, line in enumerate(code) if " -m batch.run " in line]
    assert '--campaign "%CAMPAIGN%"' in code[run_at]
    assert "--config" not in code[run_at] and "--workers" not in code[run_at]
    assert code[run_at + 1] == 'set "RC=%ERRORLEVEL%"'
    assert code[-1] == "exit /b %RC%"
    assert [line for line in code if "RC=" in line] == [code[run_at + 1]]

    # Every goto has its label.
    labels = {line[1:].lower() for line in code if line.startswith(":")}
    targets = {name.lower() for line in code for name in re.findall(r"goto :?(\w+)", line)}
    assert targets and targets <= labels
