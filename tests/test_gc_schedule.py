"""Python's garbage collector on the trainer's schedule (fff_vdi.train.gc_schedule) and its config key."""

from __future__ import annotations

import gc

import pytest

from fff_vdi.config import ExperimentConfig, TrainerConfig, validate
from fff_vdi.errors import ConfigError
from fff_vdi.train.gc_schedule import ScheduledGC


@pytest.fixture
def collections(monkeypatch):
    """The generations gc.collect was called with (the real collector still runs)."""
    calls: list[int] = []
    real = gc.collect

    def recording(generation: int = 2) -> int:
        calls.append(generation)
        return real(generation)

    monkeypatch.setattr(gc, "collect", recording)
    return calls


def test_automatic_collection_is_off_inside_and_generation_1_runs_every_n_steps(collections):
    assert gc.isenabled()
    with ScheduledGC(3) as schedule:
        assert not gc.isenabled()
        assert collections == [2]  # a full collection on entry
        collected = [schedule.tick() for _ in range(7)]
        assert collected == [False, False, True, False, False, True, False]
        assert collections == [2, 1, 1]
        schedule.collect_all()
        assert collections == [2, 1, 1, 2]
    assert gc.isenabled()


def test_stop_is_idempotent_and_keeps_a_collector_that_was_off_off():
    gc.disable()
    try:
        schedule = ScheduledGC(5).start()
        schedule.stop()
        schedule.stop()
        assert not gc.isenabled()  # it was off before: left off
    finally:
        gc.enable()
    schedule = ScheduledGC(5).start()
    schedule.stop()
    schedule.stop()
    assert gc.isenabled()


def test_zero_leaves_the_automatic_collector_alone(collections):
    with ScheduledGC(0) as schedule:
        assert gc.isenabled()
        assert not any(schedule.tick() for _ in range(100))
        schedule.collect_all()
    assert collections == [] and gc.isenabled()


def test_a_negative_count_is_refused():
    with pytest.raises(ValueError, match="every=-1"):
        ScheduledGC(-1)


def test_the_config_key_is_checked_and_named():
    cfg = ExperimentConfig(trainer=TrainerConfig(gc_every=-5))
    cfg.data.shards = "/somewhere"
    with pytest.raises(ConfigError) as error:
        validate(cfg)
    assert error.value.key == "experiment.trainer.gc_every" and "-5" in str(error.value)
    cfg.trainer.gc_every = 0
    validate(cfg)
