"""The sent-log: the campaign's ledger of claims and outcomes, one CSV line each.

It is the one place that decides what "sent", "failed" and "in-doubt" mean on disk,
and it knows nothing of SMTP or AMQP. It keeps the ledger's promises (batch.ledger) so:

- `claim()` returns only after the claim line is fsync'd;
- `record()` writes an outcome line at once, and `sync()` or the next `claim()` fsyncs it.

The file's format, and how it is read back, is batch.sentlog_file.

Several processes append to the same file. An exclusive lock on the file itself makes
every append whole and a claim's check and its claim one atomic step; the fsync comes
after the lock is released, so the workers' fsyncs overlap and the file system commits
them together.

To answer "may I send to this recipient?" without every process reading every line,
the latest status of each recipient is kept in `sent-log.index`, a SQLite table beside
the CSV and updated under the same lock. The CSV is the record; the index is derived
from it, and the launcher rebuilds it from the CSV at the start of every run.

The index knows a recipient by the form in which addresses are compared (batch.recipients),
so a list re-exported as ann@xn--bcher-kva.example finds what is known of ann@bücher.example,
and every method takes either spelling. A line keeps the spelling it was given; the index
also keeps the first spelling it saw, which it uses where it names a recipient itself
(the in-doubt lines of `settle_open_claims()`, the addresses of `unsettled()`).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from batch.ledger import QUEUED, RESEND, Outcome, Status, worker_name
from batch.locking import file_lock
from batch.recipients import compared_form
from batch.sentlog_file import SentLogError, SentLogRows, create_or_repair, format_line


class SentLog:
    """The campaign's sent-log and its index, opened by one process."""

    def __init__(self, path: Path, campaign: str, *, rebuild: bool = False) -> None:
        self.path = path
        self.campaign = campaign
        self.worker = worker_name()
        self.torn_bytes = 0
        self._dirty = False
        self._settled = {Status.SENT, Status.FAILED, Status.SUPPRESSED, Status.IN_DOUBT}
        self._blocking = self._settled | {Status.CLAIMED}
        self._waiting = [str(s) for s in Status if s not in self._settled] + [QUEUED, RESEND]
        blocking = ", ".join(f"'{status}'" for status in sorted(self._blocking))
        self._claim_sql = (
            f"INSERT INTO recipients VALUES (?, ?, '{Status.CLAIMED}', ?, ?) "
            "ON CONFLICT (address) DO UPDATE SET status = excluded.status, "
            "worker = excluded.worker, message_id = excluded.message_id "
            f"WHERE status NOT IN ({blocking})"
        )

        if rebuild or not path.exists():
            self.torn_bytes = create_or_repair(path)
        self._fd = os.open(path, os.O_RDWR | os.O_APPEND)
        self._lock = file_lock(path, self._fd)
        if rebuild:
            _remove_index(path.with_suffix(".index"))
        self._index = _open_index(path.with_suffix(".index"))
        suppressing = self._index.execute("SELECT 1 FROM suppressed LIMIT 1").fetchone()
        self._suppressing = suppressing is not None  # read once: the launcher sets it first
        if rebuild:
            with self._locked():
                self._rebuild_index()

    # The worker's side.

    def claim(self, recipient: str, message_id: str) -> bool:
        """Claim the recipient and fsync, unless it is claimed, settled or suppressed."""
        form = compared_form(recipient)
        with self._locked():
            suppressed = self._suppressing and self._settle_if_suppressed(recipient, form)
            claimed = not suppressed and self._claim(recipient, form, message_id)
        if claimed or suppressed:
            self.sync()
        return claimed

    def record(self, recipient: str, message_id: str, outcome: Outcome) -> None:
        """Write the outcome line now; it is durable after the next `sync()` or `claim()`."""
        with self._locked():
            self._append(recipient, message_id, outcome)

    def sync(self) -> None:
        """Fsync the lines this process wrote, if any are not durable yet."""
        if self._dirty:
            os.fsync(self._fd)
            self._dirty = False

    def close(self) -> None:
        """Close the files; call `sync()` first if the last lines matter."""
        self._index.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # The launcher's side.

    def expect(self, recipients: Iterable[str]) -> dict[str, str]:
        """Note recipients about to be queued; return the unsettled ones with their status."""
        forms = {r: compared_form(r) for r in recipients}
        if not forms:
            return {}
        with self._locked():
            known = self._known(list(forms.values()))
            with self._transaction():
                self._index.executemany(
                    "INSERT OR IGNORE INTO recipients (address, shown, status) VALUES (?, ?, ?)",
                    [(f, r, QUEUED) for r, f in forms.items() if f not in known],
                )
        statuses = {r: known.get(f, QUEUED) for r, f in forms.items()}
        return {r: status for r, status in statuses.items() if status not in self._settled}

    def leave_out(self, recipients: Iterable[str]) -> int:
        """Leave the unsettled ones of these recipients out of this run; return how many.

        The index forgets what it knew of them, so this run neither waits for them nor
        queues them again; the next run rebuilds their status from the CSV.
        """
        forms = [compared_form(r) for r in recipients]
        if not forms:
            return 0
        with self._locked():
            known = self._known(forms)
            unsettled = [f for f in forms if known.get(f) not in self._settled]
            # A claim is never forgotten: its outcome is still to come.
            forget = [(f,) for f in unsettled if f in known and known[f] != Status.CLAIMED]
            if forget:
                with self._transaction():
                    self._index.executemany("DELETE FROM recipients WHERE address = ?", forget)
        return len(unsettled)

    def settle(self, recipients: Iterable[str], outcome: Outcome) -> int:
        """Record the outcome for each of these recipients not claimed or settled; count them.

        The check and the lines are one step under the lock, so a claim taken meanwhile by
        a worker keeps its own outcome.
        """
        forms = {r: compared_form(r) for r in recipients}
        if not forms:
            return 0
        with self._locked():
            known = self._known(list(forms.values()))
            unsettled = [r for r, f in forms.items() if known.get(f) not in self._blocking]
            for recipient in unsettled:
                self._append(recipient, "", outcome)
        self.sync()
        return len(unsettled)

    def suppress_at_claim(self, addresses: Iterable[str], reason: str) -> None:
        """Have every later claim refuse these addresses and settle them as suppressed.

        The loader settles the suppressed recipients it reads, but workers start before it
        and may take messages an earlier run left queued; the claim is where both meet.
        Each run replaces the set: a run without a suppression list suppresses nobody new.
        """
        rows = [(compared_form(address), reason) for address in addresses]
        with self._locked(), self._transaction():
            self._index.execute("DELETE FROM suppressed")
            self._index.executemany("INSERT OR IGNORE INTO suppressed VALUES (?, ?)", rows)
        self._suppressing = bool(rows)

    def settle_open_claims(self, reason: str, worker: str | None = None) -> list[str]:
        """Record every claim without an outcome (of one worker, or all) as in-doubt."""
        query = "SELECT shown, message_id, worker FROM recipients WHERE status = ?"
        with self._locked():
            rows = self._index.execute(query, (Status.CLAIMED.value,)).fetchall()
            settled = [(r, m) for r, m, w in rows if worker is None or w == worker]
            for recipient, message_id in settled:
                self._append(recipient, message_id, Outcome(Status.IN_DOUBT, None, reason))
        self.sync()
        return [recipient for recipient, _ in settled]

    def resend_in_doubt(self) -> int:
        """Let every recipient in doubt now be claimed once more; return how many.

        Only those: a recipient whose answer is lost during this run stays in doubt until a
        person has looked, as a rerun with --in-doubt resend is asked to do.
        """
        with self._locked(), self._transaction():
            cursor = self._index.execute(
                "UPDATE recipients SET status = ? WHERE status = ?",
                (RESEND, Status.IN_DOUBT.value),
            )
        return cursor.rowcount

    def is_final(self, recipient: str) -> bool:
        """Tell whether nothing more will be attempted for this recipient."""
        return self._status(compared_form(recipient)) in self._settled

    def unsettled(self) -> set[str]:
        """Name the recipients queued, claimed or deferred (and in doubt, if resent)."""
        rows = self._index.execute(self._unsettled_query("shown"), self._waiting)
        return {address for (address,) in rows}

    def remaining(self) -> int:
        """Count the recipients queued, claimed or deferred (and in doubt, if resent)."""
        return self._index.execute(self._unsettled_query("COUNT(*)"), self._waiting).fetchone()[0]

    def _unsettled_query(self, what: str) -> str:
        marks = ",".join("?" * len(self._waiting))
        return f"SELECT {what} FROM recipients WHERE status IN ({marks})"

    def open_claims(self) -> int:
        """Count the claims that have no outcome yet."""
        query = "SELECT COUNT(*) FROM recipients WHERE status = ?"
        return self._index.execute(query, (Status.CLAIMED.value,)).fetchone()[0]

    def counts(self) -> Counter[str]:
        """Count recipients by their latest status."""
        rows = self._index.execute("SELECT status, COUNT(*) FROM recipients GROUP BY status")
        return Counter(dict(rows.fetchall()))

    # Inside the lock.

    def _locked(self) -> contextlib.AbstractContextManager[object]:
        return self._lock

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """Commit the index's statements inside as one; it is otherwise in autocommit mode."""
        self._index.execute("BEGIN")
        try:
            yield
        except BaseException:
            self._index.execute("ROLLBACK")
            raise
        self._index.execute("COMMIT")

    def _known(self, forms: list[str]) -> dict[str, str]:
        """Look up the latest status of each of these compared forms the index knows."""
        marks = ",".join("?" * len(forms))
        query = f"SELECT address, status FROM recipients WHERE address IN ({marks})"
        return dict(self._index.execute(query, forms).fetchall())

    def _claim(self, recipient: str, form: str, message_id: str) -> bool:
        """Claim the recipient unless it is taken: one statement checks and claims."""
        cursor = self._index.execute(self._claim_sql, (form, recipient, self.worker, message_id))
        if cursor.rowcount == 0:
            return False
        self._write(recipient, message_id, Outcome(Status.CLAIMED))
        return True

    def _settle_if_suppressed(self, recipient: str, form: str) -> bool:
        """Tell whether the recipient is suppressed; if so and unsettled, settle it so."""
        row = self._index.execute(
            "SELECT reason FROM suppressed WHERE address = ?", (form,)
        ).fetchone()
        if row is None:
            return False
        if self._status(form) not in self._blocking:
            self._append(recipient, "", Outcome(Status.SUPPRESSED, None, row[0]))
        return True

    def _status(self, form: str) -> str | None:
        row = self._index.execute(
            "SELECT status FROM recipients WHERE address = ?", (form,)
        ).fetchone()
        return row[0] if row else None

    def _write(self, recipient: str, message_id: str, outcome: Outcome) -> None:
        line = format_line(self.campaign, recipient, outcome, message_id, self.worker)
        os.write(self._fd, line)
        self._dirty = True

    def _append(self, recipient: str, message_id: str, outcome: Outcome) -> None:
        # The index first: killed in between, the claim stays the CSV's last line, and the
        # next start settles it as in doubt. The other way round, the claim the index still
        # showed open would be settled as in doubt after a recorded 250.
        # An update, not a replace: the spelling the index saw first stays.
        self._index.execute(
            "INSERT INTO recipients VALUES (?, ?, ?, ?, ?) ON CONFLICT (address) DO UPDATE SET "
            "status = excluded.status, worker = excluded.worker, message_id = excluded.message_id",
            (compared_form(recipient), recipient, outcome.status.value, self.worker, message_id),
        )
        self._write(recipient, message_id, outcome)

    def _rebuild_index(self) -> None:
        """Derive every recipient's latest status, and its first spelling, from the CSV."""
        latest: dict[str, tuple[str, dict[str, str]]] = {}
        for row in SentLogRows(self.path):
            form = compared_form(row["recipient"])
            first = latest.get(form)
            latest[form] = (first[0] if first else row["recipient"], row)

        with self._transaction():
            self._index.executemany(
                "INSERT INTO recipients VALUES (?, ?, ?, ?, ?)",
                (
                    (form, shown, row["status"], row["worker"], row["message_id"])
                    for form, (shown, row) in latest.items()
                ),
            )


def _remove_index(path: Path) -> None:
    """Delete the index and its WAL files, so that it is rebuilt from the CSV into a new file.

    It is written without fsync, so a power failure may leave it damaged; nothing of it is
    needed, and no worker has it open while the launcher starts a run.
    """
    for name in (path.name, f"{path.name}-wal", f"{path.name}-shm"):
        try:
            path.with_name(name).unlink(missing_ok=True)
        except OSError as error:  # Windows: a report that has it open
            raise SentLogError(f"{path}: cannot remove the index to rebuild it: {error}") from None


def _open_index(path: Path) -> sqlite3.Connection:
    """Open the index in autocommit mode; it is derived data, so it is not fsync'd."""
    index = sqlite3.connect(path, timeout=60, check_same_thread=False, isolation_level=None)
    index.execute("PRAGMA journal_mode = WAL")
    index.execute("PRAGMA synchronous = OFF")
    index.execute(
        "CREATE TABLE IF NOT EXISTS recipients (address TEXT PRIMARY KEY, shown TEXT NOT NULL,"
        " status TEXT NOT NULL, worker TEXT, message_id TEXT) WITHOUT ROWID"
    )
    index.execute("CREATE INDEX IF NOT EXISTS by_status ON recipients (status)")
    index.execute(
        "CREATE TABLE IF NOT EXISTS suppressed (address TEXT PRIMARY KEY, reason TEXT NOT NULL)"
        " WITHOUT ROWID"
    )
    return index
