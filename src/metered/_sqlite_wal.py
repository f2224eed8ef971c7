"""How metered keeps a SQLite file: its pragmas, and checkpoints off the request path.

Both exist for the cost of a write transaction, the ledger's hot path:

* **1 KiB pages.** WAL frames are whole pages, and a unit operation changes a handful of
  small rows spread over about four pages (the operation, three index entries, the
  account). With SQLite's default 4 KiB pages every request wrote some 32 KiB to the WAL;
  1 KiB pages write a quarter of that. The page size of a file is fixed when its first page
  is written, so this only applies to files metered creates; existing files keep theirs.
* **Checkpoints on a thread of their own.** SQLite copies the WAL back into the database
  inside the ``COMMIT`` that crosses its size limit, with two fsyncs: one commit in a few
  hundred took milliseconds, while metered's write turn was still held. Instead, writers
  count the operations they commit and wake a :class:`Checkpointer`, whose ``PASSIVE``
  checkpoint neither waits for nor blocks readers and the writer. SQLite's own automatic
  checkpoint stays on, at a larger size. Known limit: writes land while the background
  checkpoint runs, so the WAL is rarely fully copied when the next writer starts and SQLite
  seldom restarts it; it grows to the backstop, whose checkpoint then runs in a commit
  (about once every few thousand writes instead of every few hundred), but finds most of
  the WAL copied already. Copying the rest under the write turn, so that the WAL restarts,
  was tried: the two fsyncs then stall writers more often, for the same time in all.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading

PAGE_SIZE = 1024
CHECKPOINT_EVERY = 1000
"""Operations written between two background checkpoints (a few MiB of WAL at 1 KiB pages).

Counted in operations, not transactions: a group commit writes dozens in one transaction."""
AUTOCHECKPOINT_PAGES = 16_000
"""SQLite's own checkpoint, the backstop: 16 MiB of WAL at 1 KiB pages."""


def configure_new(conn: sqlite3.Connection, *, busy_timeout: float = 30.0) -> None:
    """Give a file that is still empty the ledger's page size, and WAL mode (no-ops later)."""
    conn.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
    conn.execute(f"PRAGMA page_size={PAGE_SIZE}")
    conn.execute("PRAGMA journal_mode=WAL")


def configure(conn: sqlite3.Connection, *, memory: bool, busy_timeout: float) -> None:
    """Apply metered's settings to a connection the ledger opens."""
    if memory:
        conn.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
    else:
        configure_new(conn, busy_timeout=busy_timeout)
        conn.execute(f"PRAGMA wal_autocheckpoint={AUTOCHECKPOINT_PAGES}")
    # WAL + synchronous=NORMAL: a commit survives a crash of the application; only an OS
    # crash or power loss can lose the last transactions (SQLite's advice for WAL).
    conn.execute("PRAGMA synchronous=NORMAL")


class Checkpointer:
    """Runs ``PRAGMA wal_checkpoint(PASSIVE)`` on its own thread, every ``every`` writes.

    :meth:`wrote` is all a writer pays: a counter, and every ``every`` calls an
    ``Event.set``. The thread starts on the first checkpoint due and keeps one connection.
    A checkpoint that fails (the file went away, say) is skipped: the next one retries, and
    SQLite's automatic checkpoint remains the backstop.
    """

    def __init__(self, path: str, *, every: int | None = None) -> None:
        self._path = path
        self._every = every or CHECKPOINT_EVERY
        self._count = 0
        self._wake = threading.Event()
        self._start_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.done = 0
        """Checkpoints so far that copied WAL frames into the file (for tests and curiosity)."""
        self.failed = 0
        """Checkpoints so far that raised, and were skipped."""

    def wrote(self, operations: int = 1) -> None:
        """Count the operations of one write transaction (approximately, across threads)."""
        self._count += operations
        if self._count < self._every:
            return
        self._count = 0
        if self._thread is None:
            with self._start_lock:
                if self._thread is None and not self._closed:
                    self._thread = threading.Thread(
                        target=self._loop, name="metered-sqlite-checkpoint", daemon=True
                    )
                    self._thread.start()
        self._wake.set()

    def _loop(self) -> None:
        conn: sqlite3.Connection | None = None
        try:
            while True:
                self._wake.wait()
                self._wake.clear()
                if self._closed:
                    return
                try:
                    if conn is None:
                        conn = sqlite3.connect(
                            self._path, isolation_level=None, check_same_thread=False
                        )
                    busy, _, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    if not busy and copied > 0:
                        self.done += 1
                except sqlite3.Error:
                    self.failed += 1
                    if conn is not None:
                        with contextlib.suppress(sqlite3.Error):
                            conn.close()
                    conn = None
        finally:
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread (after the checkpoint it may be running) and close its connection."""
        with self._start_lock:
            self._closed = True
            thread = self._thread
        self._wake.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
