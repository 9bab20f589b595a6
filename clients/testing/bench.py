#!/usr/bin/env python3
"""Records/s through the Python client against single POSTs by as many concurrent senders,
and the spool's cost: every mode sends RECORDS records from SENDERS threads to a fresh
pipeline (clients/testing/pipeline.py, the services as built in CALLCAP_BIN_DIR) and is
timed from the first record to the last 201 (``flush`` returning). Prints one table row
per mode and the ratios the issue asks for (client / single POSTs ≥ 2; spool / memory
≥ 0.5). Settings: BENCH_RECORDS (20000), BENCH_SENDERS (8)."""

import os
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "python"))

import callcap  # noqa: E402
from pipeline import Pipeline  # noqa: E402

RECORDS = int(os.environ.get("BENCH_RECORDS", "20000"))
SENDERS = int(os.environ.get("BENCH_SENDERS", "8"))


def record(company, tag, i):
    return {"company_id": company, "external_call_id": "%s-%d" % (tag, i), "external_system": "bench",
            "caller_number": "+14155550100", "recipient_number": "+919876543210",
            "call_status": "completed", "duration_seconds": 42, "outcome": "follow_up",
            "notes": "Customer interested in service"}


def run(senders, work):
    threads = [threading.Thread(target=work, args=(s,)) for s in range(senders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def mode_single(p, tag):
    client = callcap.Client(p.url, p.key, flush_on_exit=False)
    per = RECORDS // SENDERS
    started = time.monotonic()
    run(SENDERS, lambda s: [client.send(record(p.company, tag, s * per + i)) for i in range(per)])
    took = time.monotonic() - started
    client.close()
    return per * SENDERS / took


def mode_client(p, tag, spool=None, fsync="append"):
    with tempfile.TemporaryDirectory() as d:
        client = callcap.Client(p.url, p.key, flush_on_exit=False, spool_dir=(d if spool else None),
                                spool_fsync=fsync, max_queue=RECORDS + 1)
        per = RECORDS // SENDERS
        started = time.monotonic()
        run(SENDERS, lambda s: [client.capture(record(p.company, tag, s * per + i)) for i in range(per)])
        assert client.flush(600), client.stats
        took = time.monotonic() - started
        stats = client.stats
        client.close()
        assert stats["sent"] == per * SENDERS and stats["rejected"] == 0, stats
        return per * SENDERS / took


def main():
    p = Pipeline()
    try:
        rows = [
            ("single POSTs (send)", mode_single(p, "single")),
            ("client, memory queue", mode_client(p, "memory")),
            ("client, spool fsync per append", mode_client(p, "append", spool=True, fsync="append")),
            ("client, spool fsync per batch", mode_client(p, "batch", spool=True, fsync="batch")),
        ]
        stored = sum(p.wait_stored(["%s-%d" % (t, i) for t in ("single", "memory", "append", "batch")
                                    for i in range(RECORDS // SENDERS * SENDERS)], 300).values())
    finally:
        p.close()
    print("| python client: %d records, %d senders | records/s |" % (RECORDS, SENDERS))
    print("|---|---|")
    for name, rate in rows:
        print("| %s | %s |" % (name, format(round(rate), ",")))
    single, memory, append, batch = (r for _, r in rows)
    print("client / single POSTs: %.2f; spool (append) / memory: %.2f; spool (batch) / memory: %.2f; %d rows stored"
          % (memory / single, append / memory, batch / memory, stored))


if __name__ == "__main__":
    main()
