"""Hold the bench's sizes, limits and templates in one place, each with its unit."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
SMTP_SINK = Path("/usr/sbin/smtp-sink")
SINK_BACKLOG = 512

DEFAULT_SIZES = "20000,100000"
FULL_SIZE = 1_000_000
QUICK_SIZE = 2_000
MEMORY_BASELINE_SIZE = 100  # the job's memory at this size is what larger runs compare with
WORKERS = 8
RETRY_DELAYS_S = tuple(60.0 * 4**n for n in range(4))  # the job's defaults: 60 s, x4, 4 queues

SAMPLE_EVERY_S = 0.2
PROGRESS_EVERY_S = 5.0
PROFILE_DURATION_S = 10
PROFILE_TOP = 12
PROFILED = ("batch/", "smtplib.py", "sqlite3/", "pika/", "jinja2/", "<template>")

APT_TIMEOUT_S = 900
PIP_TIMEOUT_S = 300
TOOL_TIMEOUT_S = 30
SINK_START_TIMEOUT_S = 10
STOP_GRACE_S = 60  # the launcher lets its workers finish their message before leaving
SMTP_TIMEOUT_S = 30

NAMES = ("Ann Smith", "Zoë Müller", "Jean Dupont", "Li Wei", "Olúwaseun Adé")
PERSONAL_TEMPLATE = """\
From: Bench Newsletter <news@example.com>
Subject: Hello {{ name }}, here is your monthly letter
Reply-To: help@example.com

Dear {{ name }},

this is the monthly letter from the bench team. It is about as long as a real one, so
that the relay, the sent-log and the template engine see messages of a realistic size.

We are planning a meetup this spring and would be glad to see you there, {{ name }}.
The programme, the venue and the times follow in next month's letter; until then,
write to help@example.com with any question and we will answer within a day.

Three things changed since the last letter:
- the archive of past letters is searchable;
- replies to this address reach a person, not a robot;
- you can ask for a plain-text-only version.

Best regards,
The bench team

You receive this letter because {{ name }} subscribed to it.
"""
FIXED_TEMPLATE = PERSONAL_TEMPLATE.replace("{{ name }}", "reader")
HTML_TEMPLATE = """\
<html><body><p>Dear {{ name }},</p>
<p>this is the monthly letter from the bench team, as HTML.</p>
<p>We are planning a meetup this spring and would be glad to see you there, {{ name }}.</p>
<p>Best regards,<br>The bench team</p></body></html>
"""
ATTACHMENT_BYTES = 50_000  # a one-page PDF's size
PACED_SHARE = 0.5  # the rate-limited run asks for this share of the unlimited job's rate
PACED_DURATION_S = 10.0  # and sends for about this long


def job_timeout_s(n: int) -> float:
    """Allow a run at least 100 recipients a second, and two minutes to start and stop."""
    return 120 + n / 100
