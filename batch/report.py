"""`python -m batch.report`: where a campaign stands, while it runs or after it.

It reads the campaign's files and writes none of them: the sent-log, where each
recipient's last line is its state; `rejected.csv`, the rows the list could not give;
and the sent-log's index, for the recipients queued but not tried yet. A running job
appends to the sent-log while the report reads it: a last line without its newline is
still being written (or was torn by a crash), and is left for the next look.

The report is printed as text; `--html FILE` also writes it as a page (batch.report_html).
"""

from __future__ import annotations

import argparse
import csv
import os
import sqlite3
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from batch import report_html, suppression
from batch.errors import BatchError, ExitCode, UsageError
from batch.ledger import QUEUED, Status
from batch.recipients import compared_form
from batch.sentlog_file import SentLogError, SentLogRows, safe_cell

EPILOG = """\
exit codes:
  0   the report was printed (whatever the campaign's state)
  2   no such campaign, a usage error, or a FILE that cannot be written
  70  the sent-log or rejected.csv cannot be read

examples:
  python -m batch.report --state-dir state --campaign nightly-2026-12-03
  python -m batch.report state/nightly-2026-12-03 --csv audit.csv
  python -m batch.report state/nightly-2026-12-03 --html report.html
  python -m batch.report state/nightly-2026-12-03 --export-refused lists/suppressed.txt
"""
EXPORT_COLUMNS = (
    "recipient",
    "status",
    "smtp_code",
    "smtp_reply",
    "message_id",
    "last_timestamp",
)
# The order statuses are counted in; a status this list lacks comes after them.
ORDER = (
    Status.SENT,
    Status.FAILED,
    Status.IN_DOUBT,
    Status.SUPPRESSED,
    Status.DEFERRED,
    Status.CLAIMED,
    QUEUED,
)
LISTED = ((Status.FAILED, "failed"), (Status.IN_DOUBT, "in doubt"))
# The outcomes the sending rate counts: a deferred attempt is tried again, and a suppressed
# recipient is never mailed.
SETTLED = frozenset({Status.SENT, Status.FAILED, Status.IN_DOUBT})
SHOW_DEFAULT = 50


class NoCampaign(UsageError):
    """The campaign asked for has no folder or no sent-log."""


@dataclass(slots=True)
class Standing:
    """One recipient's state: its last sent-log line, and its Message-ID."""

    status: str
    smtp_code: str = ""
    smtp_reply: str = ""
    message_id: str = ""
    timestamp: str = ""


@dataclass
class Campaign:
    """What the campaign's files say at the moment they were read."""

    folder: Path
    # By the first spelling the sent-log gives; `spellings` finds it from the compared form.
    recipients: dict[str, Standing] = field(default_factory=dict)
    spellings: dict[str, str] = field(default_factory=dict)
    lines: int = 0  # complete lines of the sent-log, its header aside
    unfinished_bytes: int = 0  # a last line still being written
    rejected: int | None = None  # None: rejected.csv is not written yet
    index_problem: str = ""  # why the recipients not tried yet are not known
    # Sent, failed and in-doubt lines by the second they were written ("2026-12-03T02:30:01",
    # UTC as every timestamp of the sent-log) and their status: the sending rate over time.
    settled: Counter[tuple[str, str]] = field(default_factory=Counter)

    def counts(self) -> Counter[str]:
        """Count recipients by their status."""
        return Counter(standing.status for standing in self.recipients.values())

    def by_status(self) -> list[tuple[str, int]]:
        """Count recipients by their status, in the order the report shows them."""
        counts = self.counts()
        statuses = [str(s) for s in ORDER if counts[s]] + sorted(set(counts) - set(ORDER))
        return [(status, counts[status]) for status in statuses]

    def listed(self, status: str) -> list[tuple[str, Standing]]:
        """List the recipients whose last line has this status, in the sent-log's order."""
        return [(r, s) for r, s in self.recipients.items() if s.status == status]

    def first_spelling(self, address: str) -> str:
        """Return the spelling under which this address's recipient was first met."""
        return self.spellings.setdefault(compared_form(address), address)


def main(argv: Sequence[str] | None = None) -> int:
    """Print a campaign's report, and export it if asked; return the exit code."""
    args = parser().parse_args(argv)
    try:
        campaign = read_campaign(campaign_folder(args))
        if args.csv:
            export(campaign, args.csv)
        if args.html:
            report_html.write(campaign, args.html, show=args.show)
        refused = refused_for_good(campaign)
        added = suppression.add(args.export_refused, refused) if args.export_refused else 0
    except BatchError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    print(render(campaign, show=args.show))
    if args.csv:
        print(f"\n{len(campaign.recipients)} recipients exported to {args.csv}")
    if args.html:
        print(f"\nthe report as a page: {args.html}")
    if args.export_refused:
        print(
            f"\n{len(refused)} recipients' addresses refused for good; "
            f"{added} added to {args.export_refused}"
        )
    return ExitCode.OK


def parser() -> argparse.ArgumentParser:
    """Build the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m batch.report",
        description="Show where a campaign stands: while it runs, or after it.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "folder", nargs="?", type=Path, help="the campaign's folder (instead of the two below)"
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path(os.environ.get("MASSMAIL_STATE_DIR", "state")),
        help="where the campaign folders live [$MASSMAIL_STATE_DIR or state]",
    )
    parser.add_argument(
        "--campaign",
        default=os.environ.get("MASSMAIL_CAMPAIGN"),
        help="the campaign's name [$MASSMAIL_CAMPAIGN]",
    )
    parser.add_argument(
        "--csv", type=Path, metavar="FILE", help="export one row per recipient to FILE"
    )
    parser.add_argument(
        "--html", type=Path, metavar="FILE", help="also write the report as an HTML page"
    )
    parser.add_argument(
        "--export-refused",
        type=Path,
        metavar="FILE",
        help="add the addresses the relay refused for good to the suppression list FILE",
    )
    parser.add_argument(
        "--show",
        type=_count,
        default=SHOW_DEFAULT,
        metavar="N",
        help=f"list at most N failed and N in-doubt recipients [{SHOW_DEFAULT}]",
    )
    return parser


def _count(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return number


def campaign_folder(args: argparse.Namespace) -> Path:
    """Find the campaign's folder from the arguments; it must hold a sent-log."""
    if args.folder is not None:
        folder = args.folder
    elif args.campaign:
        folder = args.state_dir / args.campaign
    else:
        raise UsageError("name a campaign: --campaign NAME, or give its folder")
    if not (folder / "sent-log.csv").is_file():
        raise NoCampaign(f"{folder}: no such campaign (it has no sent-log.csv)")
    return folder


# Reading the campaign's files.


def read_campaign(folder: Path) -> Campaign:
    """Read where every recipient stands, and how many rows were refused."""
    campaign = Campaign(folder)
    # The index before the sent-log: a recipient claimed in between is then found in the
    # sent-log; read the other way round, it could be found in neither.
    try:
        queued = queued_recipients(folder / "sent-log.index")
    except SentLogError as error:  # the counts of the sent-log itself still stand
        queued, campaign.index_problem = [], str(error)
    rows = SentLogRows(folder / "sent-log.csv")
    for row in rows:
        recipient = campaign.first_spelling(row["recipient"])
        standing = campaign.recipients.get(recipient)
        message_id = row["message_id"] or (standing.message_id if standing else "")
        campaign.recipients[recipient] = Standing(
            row["status"], row["smtp_code"], row["smtp_reply"], message_id, row["timestamp"]
        )
        if row["status"] in SETTLED:
            campaign.settled[row["timestamp"][:19], row["status"]] += 1
    campaign.lines, campaign.unfinished_bytes = rows.lines, rows.unfinished_bytes
    for recipient in queued:
        campaign.recipients.setdefault(campaign.first_spelling(recipient), Standing(QUEUED))
    campaign.rejected = count_rejected(folder / "rejected.csv")
    return campaign


def queued_recipients(index: Path) -> list[str]:
    """Name the recipients queued but not tried yet, as the sent-log's index knows them."""
    if not index.is_file():
        return []
    try:
        connection = sqlite3.connect(f"{index.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
        try:
            # An index older than `shown` fails here as unreadable, until a run rebuilds it.
            rows = connection.execute(
                "SELECT shown FROM recipients WHERE status = ?", (QUEUED,)
            ).fetchall()
        finally:
            connection.close()
    except sqlite3.Error as error:
        raise SentLogError(f"{index}: cannot read the sent-log's index: {error}") from None
    return [address for (address,) in rows]


def count_rejected(path: Path) -> int | None:
    """Count the rows of rejected.csv, or None if the list is not read to its end yet."""
    try:
        with path.open(newline="", encoding="utf-8") as file:
            return max(0, sum(1 for _ in csv.reader(file)) - 1)
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise BatchError(f"{path}: cannot read the refused rows: {error}") from None


# Writing the report.


def refused_for_good(campaign: Campaign) -> list[str]:
    """List the failed recipients whose address the relay refused for good."""
    return [
        recipient
        for recipient, standing in campaign.recipients.items()
        if standing.status == Status.FAILED
        and suppression.address_refused(standing.smtp_code, standing.smtp_reply)
    ]


def render(campaign: Campaign, show: int = SHOW_DEFAULT) -> str:
    """Render the counts, then the failed and in-doubt recipients, as text."""
    lines = [f"campaign {campaign.folder.name} ({campaign.folder})", ""]
    lines.append(f"  {'recipients':<14}{len(campaign.recipients):>8}")
    lines += [f"  {status:<14}{count:>8}" for status, count in campaign.by_status()]
    if campaign.index_problem:
        lines.append(f"  {QUEUED:<14}not known: {campaign.index_problem}")
    refused = "not known yet" if campaign.rejected is None else f"{campaign.rejected:>8}"
    lines.append(f"  {'refused rows':<14}{refused}   ({campaign.folder / 'rejected.csv'})")

    sent_log = campaign.folder / "sent-log.csv"
    lines.append(f"  {'sent-log':<14}{sent_log} ({campaign.lines} lines)")
    if campaign.unfinished_bytes:
        lines.append(f"  {'':<14}and {campaign.unfinished_bytes} bytes of a line being written")

    for status, title in LISTED:
        listed = campaign.listed(status)
        if listed:
            lines += ["", f"{title} ({len(listed)}):"]
            lines += [
                f"  {r}  {s.message_id}  {s.smtp_reply or s.smtp_code}" for r, s in listed[:show]
            ]
            if len(listed) > show:
                lines.append(f"  ... and {len(listed) - show} more: --csv FILE lists them all")
    return "\n".join(lines)


def export(campaign: Campaign, path: Path) -> None:
    """Write one row per recipient with its final status, safe to open in a spreadsheet."""
    try:
        with path.open("w", newline="", encoding="utf-8") as file:
            writer = csv.writer(file)
            writer.writerow(EXPORT_COLUMNS)
            for recipient, s in campaign.recipients.items():
                writer.writerow(
                    [safe_cell(recipient), s.status, s.smtp_code, safe_cell(s.smtp_reply),
                     safe_cell(s.message_id), s.timestamp]
                )  # fmt: skip
    except OSError as error:
        raise UsageError(f"{path}: cannot write the export: {error.strerror}") from None


if __name__ == "__main__":
    sys.exit(main())
