"""The process's GIL switch interval while stages ask for shorter ones (agent/gil.py)."""

from __future__ import annotations

import sys

import pytest

from agent.gil import switch_interval


def test_the_shortest_asked_applies_and_the_process_interval_comes_back_last() -> None:
    """Overlapping stages (two restores, say) in any order of ending: before, each put back
    the interval it had found, so a restore that ended after one that started before it left
    the agent at the restore's interval for good."""
    before = sys.getswitchinterval()
    assert before > 0.001
    first, second = switch_interval(0.0005), switch_interval(0.0001)
    first.__enter__()
    assert sys.getswitchinterval() == pytest.approx(0.0005)
    second.__enter__()
    assert sys.getswitchinterval() == pytest.approx(0.0001)
    first.__exit__(None, None, None)  # the first to start ends first
    assert sys.getswitchinterval() == pytest.approx(0.0001)
    second.__exit__(None, None, None)
    assert sys.getswitchinterval() == before


def test_a_longer_interval_than_the_process_has_is_not_applied() -> None:
    before = sys.getswitchinterval()
    with switch_interval(before * 10):
        assert sys.getswitchinterval() == before
    assert sys.getswitchinterval() == before


def test_the_interval_comes_back_after_a_failure() -> None:
    before = sys.getswitchinterval()
    with pytest.raises(RuntimeError), switch_interval(0.0005):
        raise RuntimeError("a failed restore")
    assert sys.getswitchinterval() == before
    with pytest.raises(ValueError, match="positive"), switch_interval(0):
        pass
    assert sys.getswitchinterval() == before
