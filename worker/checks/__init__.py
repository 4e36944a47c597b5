"""The checks stage: what the machine must have for this job (GPU, packages, disk, memory), checked
once per job in the orchestrator before any expensive work (docs/architecture.md, stage 3).

    stage.py    run_checks(CheckInput) -> CheckReport: the one entry, every check in order
    gpu.py      the GPU probe (nvidia-smi, with a deadline) and the env that shows the children those GPUs
    disk.py     the disk estimate against the run folder's volume
    machine.py  what the config needs installed or configured (QLoRA, optimizer, attention, trackers, local inputs)

The predicted GPU memory comes from worker/estimate, which this package uses and never the reverse.
"""

from worker.checks.stage import CheckInput, CheckReport, run_checks

__all__ = ["CheckInput", "CheckReport", "run_checks"]
