"""The spool on its own (no pipeline): what a restarted client reads back from it."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from callcap.spool import LOG, Spool, SpoolLocked  # noqa: E402


def test_what_was_added_and_not_done_is_read_back_in_order_and_a_cut_line_is_skipped(tmp_path):
    s = Spool(str(tmp_path))
    numbers = [s.add({"external_call_id": "R-%d" % i}) for i in range(5)]
    s.done([numbers[1], numbers[3]])
    s.close()
    # A crash in the middle of the next append: the last line is cut short.
    with open(tmp_path / LOG, "a") as f:
        f.write('{"add":5,"record":{"external_ca')
    again = Spool(str(tmp_path))
    assert [r["external_call_id"] for _, r in again.left()] == ["R-0", "R-2", "R-4"]
    # Numbers go on after what was read, never reusing one.
    assert again.add({"external_call_id": "R-new"}) > numbers[-1]
    again.close()


def test_a_log_with_nothing_pending_starts_afresh_and_keeps_what_came_after(tmp_path):
    s = Spool(str(tmp_path))
    big = {"notes": "n" * 2000}
    numbers = [s.add(dict(big, external_call_id="B-%d" % i)) for i in range(700)]
    assert os.path.getsize(tmp_path / LOG) > 1 << 20
    s.done(numbers)
    assert os.path.getsize(tmp_path / LOG) < 1024, "restarted once nothing was pending"
    s.add({"external_call_id": "AFTER"})
    s.close()
    again = Spool(str(tmp_path))
    assert [r["external_call_id"] for _, r in again.left()] == ["AFTER"]
    again.close()


def test_a_living_owner_keeps_the_spool_and_a_dead_ones_lock_is_taken_over(tmp_path):
    s = Spool(str(tmp_path))
    # Another process's view: this process is alive, so its lock holds.
    with open(tmp_path / "spool.lock") as f:
        assert int(f.read()) == os.getpid()
    pid = os.fork()
    if pid == 0:
        try:
            Spool(str(tmp_path))
        except SpoolLocked:
            os._exit(0)
        os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0, "a second process was let in"
    s.close()
    # A lock left by a process that is gone (a pid that cannot be running).
    with open(tmp_path / "spool.lock", "w") as f:
        f.write("999999999")
    taken = Spool(str(tmp_path))
    taken.close()


def test_fsync_must_be_append_or_batch(tmp_path):
    with pytest.raises(ValueError):
        Spool(str(tmp_path), fsync="never")
