"""The Python client against the real pipeline (nats-server, gateway, worker, Postgres):
every record ``capture`` returned for is stored exactly once — across a gateway stopped
mid-burst, a broker gone (a 503 storm), a full queue, a ``kill -9`` of the client with a
spool, and the interpreter's exit; a refused record is reported and the others stored."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "..", "testing"))

import callcap  # noqa: E402
from pipeline import Pipeline  # noqa: E402


@pytest.fixture
def pipeline():
    p = Pipeline()
    yield p
    p.close()


def record(company, ext, **more):
    r = {"company_id": company, "external_call_id": ext, "external_system": "pytest",
         "caller_number": "+14155550100", "call_status": "completed", "duration_seconds": 42}
    r.update(more)
    return r


def exactly_once(pipeline, ids, timeout=90):
    rows = pipeline.wait_stored(ids, timeout)
    doubled = {k: n for k, n in rows.items() if k in ids and n != 1}
    assert not doubled, "stored more than once: %s" % list(doubled.items())[:3]
    stray = set(rows) - set(ids)
    assert not stray, "rows nobody captured: %s" % sorted(stray)[:3]


def test_capture_stores_every_record_once_and_send_returns_its_id(pipeline):
    client = callcap.Client(pipeline.url, pipeline.key, flush_on_exit=False)
    ids = [client.capture(record(pipeline.company, "B-%d" % i)) for i in range(2000)]
    # A record without an external id gets one, once: its resends are the same record.
    anonymous = client.capture({"company_id": pipeline.company, "notes": "no id"})
    assert anonymous.startswith("callcap-py-")
    assert client.flush(60)
    call_id = client.send(record(pipeline.company, "ONE"))
    uuid.UUID(call_id)
    assert client.send(record(pipeline.company, "ONE")) == call_id, "a resend is the same record"
    exactly_once(pipeline, ids + [anonymous, "ONE"])
    stats = client.stats
    assert stats["captured"] == 2001 and stats["sent"] == 2003 and stats["queued"] == 0, stats
    assert client.close() == 0


def test_a_shape_error_is_raised_at_capture_and_nothing_is_queued(pipeline):
    client = callcap.Client(pipeline.url, pipeline.key, flush_on_exit=False)
    for bad, field in [({"notes": "x"}, "company_id"),
                       ({"company_id": "not-a-uuid"}, "company_id"),
                       ({"company_id": pipeline.company, "duration_seconds": "60"}, "duration_seconds"),
                       ({"company_id": pipeline.company, "call_status": "done"}, "call_status")]:
        with pytest.raises(callcap.RecordError) as e:
            client.capture(bad)
        assert e.value.field == field
    assert client.stats["captured"] == 0
    client.close()


def test_a_refused_record_is_reported_and_kept_and_the_others_stored(pipeline, tmp_path):
    refused = []
    client = callcap.Client(pipeline.url, pipeline.key, spool_dir=str(tmp_path), flush_on_exit=False,
                            on_error=lambda rec, status, error, message: refused.append((rec, status, message)))
    good = [client.capture(record(pipeline.company, "G-%d" % i)) for i in range(50)]
    # Another company's record: the key may not write it (403), whatever the shape.
    other = client.capture(record(str(uuid.uuid4()), "OTHER"))
    # A number longer than the gateway takes (checked there, not here): 400.
    long = client.capture(record(pipeline.company, "LONG", caller_number="+1" + "5" * 80))
    assert client.flush(60)
    exactly_once(pipeline, good)
    assert sorted((r["external_call_id"], s) for r, s, _ in refused) == [(long, 400), (other, 403)]
    kept = [json.loads(line) for line in open(tmp_path / "rejected.jsonl")]
    assert sorted(k["record"]["external_call_id"] for k in kept) == sorted([long, other])
    assert client.stats["rejected"] == 2
    client.close()
    # Nothing of them is left to be sent again.
    again = callcap.Client(pipeline.url, pipeline.key, spool_dir=str(tmp_path), flush_on_exit=False)
    assert again.stats["queued"] == 0
    again.close()


def test_a_gateway_stopped_for_20_s_mid_burst_loses_nothing(pipeline):
    client = callcap.Client(pipeline.url, pipeline.key, backoff_max=2.0, flush_on_exit=False)
    ids = []
    stop = threading.Event()

    def dialer():
        i = 0
        while not stop.is_set():
            ids.append(client.capture(record(pipeline.company, "GW-%d" % i)))
            i += 1
            time.sleep(0.002)

    t = threading.Thread(target=dialer)
    t.start()
    time.sleep(2)
    pipeline.stop_gateway()
    time.sleep(20)
    pipeline.start_gateway()
    time.sleep(2)
    stop.set()
    t.join()
    assert client.flush(120), client.stats
    assert client.stats["retried"] > 0, "the outage was noticed"
    exactly_once(pipeline, ids, timeout=120)
    client.close()


def test_a_503_storm_while_the_broker_is_gone_is_retried_until_stored(pipeline):
    # The gateway answers 503 once its publish deadline (PUBLISH_TIMEOUT_MS, 10 s) passes.
    client = callcap.Client(pipeline.url, pipeline.key, timeout=15.0, backoff_max=2.0, flush_on_exit=False)
    pipeline.stop_nats()
    ids = [client.capture(record(pipeline.company, "S-%d" % i)) for i in range(300)]
    time.sleep(25)
    assert client.stats["sent"] == 0 and client.stats["retried"] > 0, client.stats
    pipeline.start_nats()
    assert client.flush(120), client.stats
    exactly_once(pipeline, ids, timeout=120)
    client.close()


def test_a_full_queue_blocks_or_raises_and_drops_nothing(pipeline):
    pipeline.stop_gateway()
    client = callcap.Client(pipeline.url, pipeline.key, max_queue=50, block=False, backoff_max=1.0,
                            flush_on_exit=False)
    ids = [client.capture(record(pipeline.company, "Q-%d" % i)) for i in range(50)]
    with pytest.raises(callcap.QueueFull):
        client.capture(record(pipeline.company, "Q-over"))
    client.block = True
    more = []
    t = threading.Thread(target=lambda: more.extend(
        client.capture(record(pipeline.company, "QB-%d" % i)) for i in range(100)))
    t.start()
    time.sleep(2)
    assert t.is_alive() and not more, "capture blocks while the queue is full"
    pipeline.start_gateway()
    t.join(60)
    assert client.flush(60)
    exactly_once(pipeline, ids + more)
    assert client.stats["blocked"] > 0
    client.close()


DIALER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[1])
    import callcap
    url, key, company, spool, n = sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6])
    client = callcap.Client(url, key, spool_dir=spool or None, linger=0.05, batch_size=50)
    for i in range(n):
        if sys.argv[7] == "hang" and i == n // 2:
            # Half captured (and sending): the test cuts the gateway off, then says go.
            print("half", flush=True)
            sys.stdin.readline()
        client.capture({"company_id": company, "external_call_id": "K-%d" % i, "call_status": "completed"})
    print("captured", flush=True)
    if sys.argv[7] == "hang":
        time.sleep(3600)
""")


def dialer(pipeline, spool, n, then):
    return subprocess.Popen([sys.executable, "-c", DIALER, os.path.join(HERE, ".."), pipeline.url, pipeline.key,
                             pipeline.company, spool, str(n), then], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def test_kill_9_mid_burst_with_a_spool_then_another_client_sends_the_rest(pipeline, tmp_path):
    spool = str(tmp_path / "spool")
    proc = dialer(pipeline, spool, 3000, "hang")
    # Mid-burst: the first half captured and on its way, then the gateway gone, so the
    # second half is captured but cannot be sent before the kill.
    assert proc.stdout.readline().strip() == "half"
    pipeline.stop_gateway()
    proc.stdin.write("go\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "captured"
    # The spool is the killed one's until it is gone.
    with pytest.raises(callcap.SpoolLocked):
        callcap.Client(pipeline.url, pipeline.key, spool_dir=spool, flush_on_exit=False)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    part = sum(pipeline.ids().values())
    assert 0 < part < 3000, "%d stored before the kill" % part
    pipeline.start_gateway()
    second = callcap.Client(pipeline.url, pipeline.key, spool_dir=spool, flush_on_exit=False)
    assert second.stats["queued"] > 0
    assert second.flush(120)
    exactly_once(pipeline, ["K-%d" % i for i in range(3000)])
    second.close()


def test_what_is_queued_at_exit_is_sent_before_the_interpreter_ends(pipeline):
    proc = dialer(pipeline, "", 1500, "exit")
    assert proc.stdout.readline().strip() == "captured"
    assert proc.wait(60) == 0
    exactly_once(pipeline, ["K-%d" % i for i in range(1500)])
