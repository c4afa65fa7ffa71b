"""The bench's lockstep timing (bench/common.py `run_lockstep`, rows 5 and 8's peers): children load side by side,
then take turns one step at a time in the order A B, B A, A B, ..., each step running alone."""

import sys
import time

from bench.common import BenchError, run_lockstep

CHILD = """
import sys, time
from bench.common import emit, turn_gate
gate, spans = turn_gate(True), []
for i in range({steps}):
    if {fail_at} == i:
        raise RuntimeError("step {{}} failed".format(i))
    gate()
    t = time.time()
    time.sleep(0.05)
    spans.append((t, time.time()))
emit({{"spans": spans}})
"""


def child(steps: int = 3, fail_at: int = -1) -> list[str]:
    return [sys.executable, "-c", CHILD.format(steps=steps, fail_at=fail_at)]


def test_children_take_turns_one_step_at_a_time_in_alternating_order():
    out = run_lockstep({"a": (child(), "test-lockstep-a"), "b": (child(), "test-lockstep-b")}, timeout=120)
    steps = sorted((t0, t1, key) for key in "ab" for t0, t1 in out[key]["spans"])
    assert [key for *_, key in steps] == ["a", "b", "b", "a", "a", "b"]
    assert all(t1 <= n0 for (_, t1, _), (n0, _, _) in zip(steps, steps[1:]))  # no two steps at once


def test_a_child_that_fails_is_reported_and_the_other_runs_to_its_end():
    out = run_lockstep({"a": (child(fail_at=1), "test-lockstep-a"), "b": (child(4), "test-lockstep-b")},
                       timeout=120)
    assert isinstance(out["a"], BenchError) and "step 1 failed" in str(out["a"])
    assert len(out["b"]["spans"]) == 4


def test_children_past_the_timeout_are_stopped_with_an_error():
    stuck = [sys.executable, "-c", "import time; time.sleep(60)"]
    t = time.perf_counter()
    out = run_lockstep({"a": (child(), "test-lockstep-a"), "b": (stuck, "test-lockstep-b")}, timeout=5)
    assert time.perf_counter() - t < 30
    assert all(isinstance(out[k], BenchError) and "timed out" in str(out[k]) for k in "ab")
