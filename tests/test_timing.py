"""kvlib.timing.compare: the median of interleaved timings, per contender."""

import pytest

from kvlib.errors import BenchError
from kvlib.timing import compare


def fake_timer(durations):
    """A timer that returns the next duration listed for each contender, calling it too."""
    queues = {name: list(ds) for name, ds in durations.items()}

    def timer(fn, device):
        return queues[fn()].pop(0)

    return timer


def test_compare_returns_each_contenders_median_and_takes_turns():
    calls = []

    def contender(name):
        def fn():
            calls.append(name)
            return name

        return fn

    durations = {"a": [5.0, 1.0, 2.0], "b": [0.1, 9.0, 0.3]}
    fns = {"a": contender("a"), "b": contender("b")}
    medians = compare(fns, reps=3, warmup=0, timer=fake_timer(durations))
    assert medians == {"a": 2.0, "b": 0.3}, medians  # medians, not means (a's mean is 2.67)
    assert calls == ["a", "b", "b", "a", "a", "b"], f"not interleaved: {calls}"


def test_compare_checks_its_arguments():
    with pytest.raises(BenchError, match="reps must be an int >= 1, got 0"):
        compare({"a": lambda: None}, reps=0)
    with pytest.raises(BenchError, match="at least one contender"):
        compare({}, reps=1)


def test_compare_times_real_calls():
    medians = compare({"noop": lambda: None}, reps=3)
    assert list(medians) == ["noop"] and isinstance(medians["noop"], float), medians
