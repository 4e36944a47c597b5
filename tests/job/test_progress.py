"""Progress reaches the caller every interval_s or every 5% of the steps, whichever comes first."""

from __future__ import annotations

from worker.job.updates import Throttle


def test_step_updates_pass_every_5_percent_of_the_steps_even_within_the_interval():
    sent = []
    throttle = Throttle(sent.append, interval_s=3600)
    for step in range(1, 101):
        throttle({"stage": "train", "step": step, "total_steps": 100})
    assert [u["step"] for u in sent] == [1, *range(6, 101, 5)]
    few = []
    throttle = Throttle(few.append, interval_s=3600)
    for step in range(1, 5):  # 5% of 4 steps is less than one: every step
        throttle({"stage": "train", "step": step, "total_steps": 4})
    assert [u["step"] for u in few] == [1, 2, 3, 4]


def test_a_train_event_brings_the_gpus_clock_and_power_to_the_caller_and_no_paths():
    from worker.job.updates import event_update

    event = {
        "stage": "train",
        "step": 3,
        "total_steps": 9,
        "loss": 1.5,
        "step_ms": 428.7,
        "gpu_sm_mhz": 1545.0,
        "gpu_power_w": 692.9,
        "gpu_busy_pct": 55.0,
    }
    update = event_update("r1", "train", {**event, "path": "/runpod-volume/runs/r1/checkpoint-3"})
    assert update["gpu_sm_mhz"] == 1545.0 and update["gpu_power_w"] == 692.9 and "path" not in update
    assert update["step_ms"] == 428.7 and update["gpu_busy_pct"] == 55.0
