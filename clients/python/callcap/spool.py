"""The disk spool: what ``capture`` returned for stays on disk until its 201.

One directory holds ``spool.log``, a log of lines ``{"add": n, "record": {...}}`` and
``{"done": n}``, and ``spool.lock``. A record is appended (and, by default, fsynced)
before ``capture`` returns; its ``done`` line is appended after its 201 (or once it was
refused and written to ``rejected.jsonl``). A client started on the directory reads the
log: every ``add`` without its ``done`` is sent again. A line cut short by a crash is
the last line and is skipped (its record's ``capture`` had not returned). When nothing is
pending the log is started afresh (written to a new file, fsynced, renamed).

The lock: ``spool.lock`` created exclusively, holding the owner's pid. A second client
while the owner lives is refused (:class:`SpoolLocked`); a lock left by a killed
process (its pid gone) is taken over. The Node client keeps the same files the same way.
"""

import errno
import json
import os
import threading

LOG = "spool.log"
LOCK = "spool.lock"
REJECTED = "rejected.jsonl"


class SpoolLocked(RuntimeError):
    """Another living process holds the spool."""


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """The spool in ``directory``; ``fsync``: ``"append"`` (every record on disk before
    ``capture`` returns) or ``"batch"`` (on disk once per batch the sender takes: a power
    cut can lose the records captured since the last one; a process crash cannot)."""

    def __init__(self, directory, fsync="append"):
        if fsync not in ("append", "batch"):
            raise ValueError('fsync is "append" or "batch"')
        self.directory = directory
        self.fsync_each = fsync == "append"
        os.makedirs(directory, exist_ok=True)
        self._lock_path = os.path.join(directory, LOCK)
        self._take_lock()
        self._mutex = threading.Lock()
        self._next = 0
        self._pending = {}
        self._read()
        self._file = open(os.path.join(directory, LOG), "a", encoding="utf-8")
        self._dirty = False
        # Group commit of the appends: lines written and lines known durable; one fsync
        # covers every line written before it began, so concurrent captures share it.
        self._written = 0
        self._synced = 0
        self._syncing = False
        self._sync_cond = threading.Condition()

    def _take_lock(self):
        for _ in range(3):
            try:
                fd = os.open(self._lock_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                try:
                    with open(self._lock_path, encoding="utf-8") as f:
                        pid = int(f.read().strip() or "0")
                except (OSError, ValueError):
                    pid = 0
                if pid and pid != os.getpid() and _alive(pid):
                    raise SpoolLocked(
                        "the spool %s is in use by process %d" % (self.directory, pid)) from None
                # Left by a process that is gone: take it over.
                try:
                    os.unlink(self._lock_path)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
                f.flush()
                os.fsync(f.fileno())
            return
        raise SpoolLocked("could not take the lock of the spool %s" % self.directory)

    def _read(self):
        path = os.path.join(self.directory, LOG)
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().split("\n")
        except FileNotFoundError:
            return
        for line in lines:
            if not line:
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # the last line, cut short by a crash before capture returned
            if "add" in entry:
                self._pending[entry["add"]] = entry["record"]
                self._next = max(self._next, entry["add"] + 1)
            elif "done" in entry:
                self._pending.pop(entry["done"], None)

    def left(self):
        """What a previous client left: ``[(n, record)]`` in capture order."""
        with self._mutex:
            return sorted(self._pending.items())

    def add(self, record):
        """Appends ``record``; its number. On disk (fsynced) before it returns unless
        ``fsync="batch"``. Concurrent callers share fsyncs: each waits for one that began
        after its line was written."""
        line = json.dumps({"add": None, "record": record}, separators=(",", ":"))
        with self._mutex:
            n = self._next
            self._next += 1
            self._pending[n] = record
            self._file.write('{"add":%d%s\n' % (n, line[len('{"add":null'):]))
            self._file.flush()
            self._written += 1
            mine = self._written
            if not self.fsync_each:
                self._dirty = True
        if self.fsync_each:
            self._durable(mine)
        return n

    def _durable(self, mine):
        with self._sync_cond:
            while self._synced < mine:
                if self._syncing:
                    self._sync_cond.wait()
                    continue
                self._syncing = True
                with self._mutex:
                    target = self._written
                    fd = self._file.fileno()
                self._sync_cond.release()
                try:
                    os.fsync(fd)
                finally:
                    self._sync_cond.acquire()
                    self._syncing = False
                    self._synced = max(self._synced, target)
                    self._sync_cond.notify_all()

    def sync(self):
        """Makes every appended line durable (``fsync="batch"``: once per batch)."""
        with self._mutex:
            if self._dirty:
                os.fsync(self._file.fileno())
                self._dirty = False

    def done(self, numbers):
        """Marks records as handled (stored, or refused and written to rejected.jsonl)."""
        if not numbers:
            return
        with self._mutex:
            for n in numbers:
                self._pending.pop(n, None)
                self._file.write('{"done":%d}\n' % n)
            self._file.flush()
            self._written += 1
            mine = self._written
        # Shared with the appends' fsyncs (a lost done line only means a resend, which the
        # stored id makes harmless; it is made durable all the same).
        self._durable(mine)
        # Starting the log afresh swaps the file: never under an fsync of the old one.
        with self._sync_cond:
            while self._syncing:
                self._sync_cond.wait()
            with self._mutex:
                if not self._pending and self._file.tell() > 1 << 20:
                    self._restart()
                    self._synced = self._written

    def _restart(self):
        # Nothing pending: the log starts afresh (its replacement made durable first).
        path = os.path.join(self.directory, LOG)
        tmp = path + ".new"
        with open(tmp, "w", encoding="utf-8") as f:
            f.flush()
            os.fsync(f.fileno())
        self._file.close()
        os.replace(tmp, path)
        _fsync_dir(self.directory)
        self._file = open(path, "a", encoding="utf-8")

    def reject(self, record, status, error):
        """Keeps a refused record in rejected.jsonl (never retried)."""
        line = json.dumps({"status": status, "error": error, "record": record}, separators=(",", ":"))
        with self._mutex:
            with open(os.path.join(self.directory, REJECTED), "a", encoding="utf-8") as f:
                f.write(line + "\n")
                f.flush()
                os.fsync(f.fileno())

    def pending(self):
        with self._mutex:
            return len(self._pending)

    def close(self):
        with self._mutex:
            if self._file.closed:
                return
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            try:
                os.unlink(self._lock_path)
            except OSError as e:
                if e.errno != errno.ENOENT:
                    raise
