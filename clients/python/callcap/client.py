"""The client: ``capture`` queues (and spools), a background sender posts batches and
retries what was not stored; ``send`` posts one record and waits for its 201."""

import atexit
import collections
import gzip
import http.client
import json
import logging
import random
import threading
import time
import urllib.parse

from .record import check, with_identity
from .spool import Spool

log = logging.getLogger("callcap")

# The most of an answer read (a batch of 1,000 items' answers is ~150 KiB).
MAX_ANSWER_BYTES = 4 << 20
# Statuses a record is refused with for good: sending it again cannot help.
REFUSED = (400, 401, 403, 413, 415, 422)


class QueueFull(RuntimeError):
    """``capture`` with ``block=False`` while the queue holds ``max_queue`` records."""


class Rejected(RuntimeError):
    """The gateway refused the record (``status``, ``error``, ``message``): fix it before
    sending it again."""

    def __init__(self, status, error, message):
        super().__init__("%s %s: %s" % (status, error, message))
        self.status = status
        self.error = error
        self.message = message


class Unavailable(RuntimeError):
    """The record was not confirmed within the retry budget."""


class _Item:
    __slots__ = ("n", "record", "first_try", "attempts")

    def __init__(self, n, record):
        self.n = n
        self.record = record
        self.first_try = None
        self.attempts = 0


class _Http:
    """One keep-alive connection to the gateway (redirects are never followed: they would
    carry the API key elsewhere)."""

    def __init__(self, url, api_key, timeout):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ValueError("url must be http:// or https://")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        self._base = parts.path.rstrip("/")
        self._key = api_key
        self._timeout = timeout
        self._conn = None

    def post(self, path, body, compress):
        """(status, headers, parsed JSON or None); raises OSError/HTTPException when nothing
        usable came back."""
        data = json.dumps(body, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json", "x-api-key": self._key,
                   "Accept-Encoding": "gzip", "User-Agent": "callcap-python/0.1"}
        if compress and len(data) > 1024:
            data = gzip.compress(data, 5)
            headers["Content-Encoding"] = "gzip"
        for attempt in (0, 1):
            if self._conn is None:
                cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
                self._conn = cls(self._host, self._port, timeout=self._timeout)
            try:
                self._conn.request("POST", self._base + path, body=data, headers=headers)
                resp = self._conn.getresponse()
                raw = resp.read(MAX_ANSWER_BYTES + 1)
            except (OSError, http.client.HTTPException):
                self.close()
                # A kept-alive connection the server had closed: once more on a new one.
                if attempt == 0:
                    continue
                raise
            if resp.getheader("Content-Encoding") == "gzip":
                raw = gzip.decompress(raw)
            if resp.getheader("Connection", "").lower() == "close" or len(raw) > MAX_ANSWER_BYTES:
                self.close()
            try:
                parsed = json.loads(raw) if raw else None
            except ValueError:
                parsed = None
            return resp.status, resp, parsed
        raise OSError("unreachable")

    def close(self):
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _retry_after(resp):
    try:
        return float(resp.getheader("Retry-After"))
    except (TypeError, ValueError):
        return 0.0


class Client:
    """A Call Capture client for one API key.

    ``capture(record)`` checks the record, queues it (and appends it to the spool) and
    returns its ``external_call_id``; a background thread posts ``/v1/calls/batch`` (up to
    ``batch_size`` records or ``linger`` seconds) and retries what was not stored.
    ``send(record)`` posts one record and returns its ``call_history_id``.

    url, api_key: the gateway and its ``x-api-key``.
    batch_size (500), linger (0.2 s): a batch is sent when full or when its first record
        has waited this long.
    max_queue (10,000): records captured and not yet stored; past it ``capture`` blocks
        (``block=True``) or raises :class:`QueueFull`. Nothing is ever dropped.
    spool_dir: keep captured records on disk until their 201; a client started on the
        same directory sends what a killed one left. ``spool_fsync``: ``"append"`` (each
        record durable before ``capture`` returns) or ``"batch"`` (once per batch: faster;
        a power cut may lose the records captured since the last batch, a crash cannot).
    timeout (10 s): one request's. retry_budget (3600 s): how long a record is retried
        (503, 429, timeouts, no connection) with exponential backoff and full jitter
        (``backoff_base`` 0.2 s doubling up to ``backoff_max`` 30 s, never sooner than
        ``Retry-After``); past it ``on_error`` is told and, with a spool, the record stays
        there for the next start.
    on_error(record, status, error, message): a record refused for good (400, 401, 403,
        413) or out of retry budget; refused ones are also kept in
        ``spool_dir/rejected.jsonl``.
    flush_on_exit (True), exit_timeout (10 s): at interpreter exit, send what is queued
        within the deadline and log what is left (and where).
    """

    def __init__(self, url, api_key, *, batch_size=500, linger=0.2, max_queue=10000,
                 block=True, spool_dir=None, spool_fsync="append", timeout=10.0,
                 retry_budget=3600.0, backoff_base=0.2, backoff_max=30.0, on_error=None,
                 flush_on_exit=True, exit_timeout=10.0, compress=True):
        if not 1 <= batch_size <= 1000:
            raise ValueError("batch_size is 1 to 1000 (the gateway's MAX_BATCH_RECORDS)")
        self._url, self._key, self._timeout = url, api_key, timeout
        self._http = _Http(url, api_key, timeout)
        self.batch_size, self.linger, self.max_queue, self.block = batch_size, linger, max_queue, block
        self.retry_budget, self.backoff_base, self.backoff_max = retry_budget, backoff_base, backoff_max
        self.on_error, self.compress = on_error, compress
        self._cond = threading.Condition()
        self._queue = collections.deque()
        self._in_flight = 0
        self._reserved = 0
        self._closing = False
        self._stop = threading.Event()
        self._next = 0
        self._counts = collections.Counter()
        self._spool = Spool(spool_dir, spool_fsync) if spool_dir else None
        if self._spool is not None:
            left = self._spool.left()
            for n, record in left:
                self._queue.append(_Item(n, record))
            if left:
                log.info("callcap: %d record(s) left in the spool %s are sent again", len(left), spool_dir)
        self._sender = threading.Thread(target=self._run, name="callcap-sender", daemon=True)
        self._sender.start()
        self._exit_timeout = exit_timeout
        if flush_on_exit:
            atexit.register(self._at_exit)

    # ---- the caller's side

    def capture(self, record):
        """Queues ``record`` (spooled first, with a spool); its ``external_call_id``.
        Raises :class:`RecordError` for a record the gateway would refuse by shape,
        :class:`QueueFull` when full and ``block=False``."""
        check(record)
        record = with_identity(record)
        with self._cond:
            if self._closing:
                raise RuntimeError("the client is closed")
            while len(self._queue) + self._in_flight + self._reserved >= self.max_queue:
                if not self.block:
                    raise QueueFull("%d records are waiting to be stored" % self.max_queue)
                self._counts["blocked"] += 1
                self._cond.wait()
            # The place is kept while the record is spooled, outside the lock, so that
            # concurrent captures share the spool's fsyncs.
            self._reserved += 1
        try:
            n = self._spool.add(record) if self._spool is not None else None
        except BaseException:
            with self._cond:
                self._reserved -= 1
                self._cond.notify_all()
            raise
        with self._cond:
            self._reserved -= 1
            if n is None:
                n = self._next
                self._next += 1
            else:
                self._counts["spooled"] += 1
            self._queue.append(_Item(n, record))
            self._counts["captured"] += 1
            self._cond.notify_all()
        return record["external_call_id"]

    def send(self, record):
        """Posts ``record`` alone, retried as the sender retries; its ``call_history_id``.
        Raises :class:`Rejected` (refused: fix the record) or :class:`Unavailable` (not
        confirmed within the retry budget)."""
        check(record)
        record = with_identity(record)
        conn = _Http(self._url, self._key, self._timeout)
        started = time.monotonic()
        attempt = 0
        try:
            while True:
                wait = None
                try:
                    status, resp, body = conn.post("/v1/calls", record, self.compress)
                except (OSError, http.client.HTTPException) as e:
                    log.info("callcap: no answer (%s); retrying", e)
                    status, resp, body = None, None, None
                if status in (200, 201):
                    self._counts["sent"] += 1
                    return body["data"]["call_history_id"]
                if status in REFUSED:
                    self._counts["rejected"] += 1
                    body = body or {}
                    raise Rejected(status, body.get("error"), body.get("message"))
                wait = self._backoff(attempt, _retry_after(resp) if resp is not None else 0.0)
                if time.monotonic() - started + wait > self.retry_budget:
                    raise Unavailable("not confirmed within %s s (last: %s)" % (self.retry_budget, status))
                self._counts["retried"] += 1
                attempt += 1
                time.sleep(wait)
        finally:
            conn.close()

    def flush(self, timeout=None):
        """Waits until every captured record is stored or refused; False if ``timeout``
        (seconds) passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._cond.notify_all()
            while self._queue or self._in_flight:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left if left is None else min(left, 0.5))
        return True

    def close(self, timeout=10.0):
        """Flushes within ``timeout`` and stops; returns how many records were not stored
        (kept in the spool when there is one)."""
        done = self.flush(timeout)
        with self._cond:
            self._closing = True
            self._stop.set()
            left = len(self._queue) + self._in_flight
            self._cond.notify_all()
        self._sender.join(timeout=max(1.0, self._timeout + 1))
        if self._spool is not None:
            self._spool.close()
        self._http.close()
        if not done and left:
            where = ("kept in the spool %s, sent by the next client started on it" % self._spool.directory
                     if self._spool is not None else "LOST: no spool_dir was given")
            log.warning("callcap: %d record(s) not stored at close (%s)", left, where)
        return left

    def _at_exit(self):
        with self._cond:
            if self._closing:
                return
        self.close(self._exit_timeout)

    @property
    def stats(self):
        """Counters: captured, sent, retried, rejected, gave_up, spooled, blocked, and
        queued (captured, not yet stored)."""
        with self._cond:
            out = dict(self._counts)
            out["queued"] = len(self._queue) + self._in_flight
        for k in ("captured", "sent", "retried", "rejected", "gave_up", "spooled", "blocked"):
            out.setdefault(k, 0)
        return out

    # ---- the sender

    def _backoff(self, attempt, retry_after):
        ceiling = min(self.backoff_max, self.backoff_base * (2 ** min(attempt, 30)))
        return max(random.uniform(0, ceiling), retry_after)

    def _take(self):
        """The next batch, waiting for the first record and then up to ``linger`` for more;
        None when closing with nothing left."""
        with self._cond:
            # Once closed, nothing more is sent: what is left stays in the spool.
            while not self._queue or self._closing:
                if self._closing:
                    return None
                self._cond.wait()
            deadline = time.monotonic() + self.linger
            while len(self._queue) < self.batch_size and not self._closing:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch = [self._queue.popleft() for _ in range(min(self.batch_size, len(self._queue)))]
            self._in_flight += len(batch)
            return batch

    def _run(self):
        attempt = 0
        while True:
            batch = self._take()
            if batch is None:
                return
            if self._spool is not None:
                self._spool.sync()
            now = time.monotonic()
            for item in batch:
                if item.first_try is None:
                    item.first_try = now
            retry, retry_after = self._post(batch)
            with self._cond:
                if retry:
                    # Back to the front, in order: a later record of a call stays later.
                    self._queue.extendleft(reversed(retry))
                self._in_flight -= len(batch)
                self._cond.notify_all()
            if retry:
                # Not woken by captures: only close() cuts a backoff short.
                self._stop.wait(self._backoff(attempt, retry_after))
                attempt += 1
            else:
                attempt = 0

    def _post(self, batch):
        """Posts one batch; the items to retry and the server's Retry-After."""
        try:
            status, resp, body = self._http.post(
                "/v1/calls/batch", {"calls": [i.record for i in batch]}, self.compress)
        except (OSError, http.client.HTTPException) as e:
            log.info("callcap: no answer for %d record(s) (%s); retrying", len(batch), e)
            return self._retrying(batch), 0.0
        if status == 413 and len(batch) > 1:
            half = len(batch) // 2
            log.info("callcap: a batch of %d was too large; sending it in halves", len(batch))
            first, after = self._post(batch[:half])
            second, after2 = self._post(batch[half:])
            return first + second, max(after, after2)
        results = (body or {}).get("results") if status in (201, 207) else None
        if status == 201 and results is None:
            results = [{"index": i, "status": 201} for i in range(len(batch))]
        if results is None:
            if status in REFUSED:
                body = body or {}
                for item in batch:
                    self._refuse(item, status, body.get("error"), body.get("message"))
                return [], 0.0
            log.info("callcap: %s for %d record(s); retrying", status, len(batch))
            return self._retrying(batch), _retry_after(resp)
        stored, retry = [], []
        answered = set()
        for result in results:
            index = result.get("index")
            if not isinstance(index, int) or not 0 <= index < len(batch) or index in answered:
                continue
            answered.add(index)
            item = batch[index]
            code = result.get("status")
            if code in (200, 201):
                stored.append(item)
            elif code in REFUSED:
                self._refuse(item, code, result.get("error"), result.get("message"))
            else:
                retry.append(item)
        # A record the answer does not account for is sent again (safe: same id).
        retry.extend(item for i, item in enumerate(batch) if i not in answered)
        if self._spool is not None:
            self._spool.done([i.n for i in stored])
        with self._cond:
            self._counts["sent"] += len(stored)
        return self._retrying(retry), _retry_after(resp)

    def _retrying(self, items):
        """The items still within their retry budget; the others are given up (told)."""
        keep = []
        now = time.monotonic()
        for item in items:
            item.attempts += 1
            if now - item.first_try > self.retry_budget:
                with self._cond:
                    self._counts["gave_up"] += 1
                log.error("callcap: record %s not confirmed within %s s; %s", item.record.get("external_call_id"),
                          self.retry_budget, "kept in the spool" if self._spool is not None else "given up")
                self._tell(item.record, None, "Unavailable", "not confirmed within the retry budget")
            else:
                keep.append(item)
        with self._cond:
            self._counts["retried"] += len(keep)
        return keep

    def _refuse(self, item, status, error, message):
        with self._cond:
            self._counts["rejected"] += 1
        log.warning("callcap: record %s refused: %s %s: %s", item.record.get("external_call_id"), status, error, message)
        if self._spool is not None:
            self._spool.reject(item.record, status, message)
            self._spool.done([item.n])
        self._tell(item.record, status, error, message)

    def _tell(self, record, status, error, message):
        if self.on_error is None:
            return
        try:
            self.on_error(record, status, error, message)
        except Exception:  # noqa: BLE001 - the caller's callback must not stop the sender
            log.exception("callcap: on_error raised")
