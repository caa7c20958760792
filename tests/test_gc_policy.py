"""The collector's threshold while engines serve, and back after the last one stops; a worker process's
settings once it is built."""

from __future__ import annotations

import gc

import pytest

from streamvlm.engine import gc_policy


@pytest.fixture
def collector():
    """The collector's threshold and frozen objects as they were, after the test."""
    before = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


@pytest.fixture
def no_engines(monkeypatch):
    """Engines counted from here, whatever engines other tests of this process still hold."""
    monkeypatch.setattr(gc_policy, "_engines_serving", 0)
    monkeypatch.setattr(gc_policy, "_saved_threshold", None)


def test_threshold_raised_while_any_engine_serves_then_restored(collector, no_engines):
    gc.set_threshold(700, 10, 10)
    gc_policy.serving_started()
    gc_policy.serving_started()
    assert gc.get_threshold() == (gc_policy.SERVING_GEN0_THRESHOLD, 10, 10)
    gc_policy.serving_stopped()
    assert gc.get_threshold()[0] == gc_policy.SERVING_GEN0_THRESHOLD
    gc_policy.serving_stopped()
    assert gc.get_threshold() == (700, 10, 10)
    gc_policy.serving_stopped()   # one too many: nothing changes
    assert gc.get_threshold() == (700, 10, 10)


def test_collection_turned_off_stays_off(collector, no_engines):
    gc.set_threshold(0)
    gc_policy.serving_started()
    assert gc.get_threshold()[0] == 0
    gc_policy.serving_stopped()


def test_worker_freezes_start_up_and_raises_the_young_threshold(collector):
    from workers import heap

    gc.set_threshold(700, 10, 10)
    gc.unfreeze()
    heap.settle_after_build()
    assert gc.get_threshold() == (heap.WORKER_GEN0_THRESHOLD, 10, 10)
    assert gc.get_freeze_count() > 0


def test_worker_leaves_collection_off_when_it_is_off(collector):
    from workers import heap

    gc.set_threshold(0)
    heap.settle_after_build()
    assert gc.get_threshold()[0] == 0
