"""The shared timing loop waits for other runtimes' spinning threads before it times an arm."""

import sys
import threading
import time

import pytest

from sparseforge.report.latency import measure, settle

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/task")


def _spin(seconds: float) -> threading.Thread:
    """A thread that burns CPU for ``seconds`` as a runtime's pool does after a call."""
    def run():
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@linux_only
def test_settle_waits_for_a_spinning_thread_to_stop():
    t = _spin(0.25)
    t0 = time.perf_counter()
    waited = settle(min_s=0.01, quiet_s=0.02, max_s=2.0)
    assert not t.is_alive() or time.perf_counter() - t0 >= 2.0
    assert waited >= 0.2, f"settle returned after {waited:.3f} s while another thread spun for 0.25 s"
    t.join()


@linux_only
def test_settle_returns_soon_when_nothing_runs():
    waited = settle(min_s=0.01, quiet_s=0.02, max_s=2.0)
    assert waited < 0.5


@linux_only
def test_settle_gives_up_after_max_s():
    t = _spin(1.0)
    waited = settle(min_s=0.01, quiet_s=0.02, max_s=0.2)
    assert 0.2 <= waited < 0.6
    t.join()


def test_measure_times_every_arm_in_rounds_of_a_block():
    calls = {"a": 0, "b": 0}

    def arm(k):
        def f():
            calls[k] += 1
            time.sleep(0.002 if k == "a" else 0.006)
        return f

    res = measure({"a": arm("a"), "b": arm("b")}, runs=6, block=3, pause=0.0, warmup=1, keep_times=True)
    assert res["a"]["runs"] == res["b"]["runs"] == 6 and len(res["a"]["times_ms"]) == 6
    # 1 warm-up + per block 2 discarded + 3 timed, 2 blocks
    assert calls == {"a": 11, "b": 11}
    assert res["a"]["median_ms"] < res["b"]["median_ms"]
