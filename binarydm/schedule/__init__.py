"""Progressive initialization and the EBB switch, as pure functions of the step number."""

from binarydm.schedule.progressive import (
    ScheduleState,
    active_stage,
    apply_schedule,
    check_schedule,
    ebb_bases,
    ebb_gain,
    last_stage,
    num_stages,
    stage_start,
)

__all__ = [
    "ScheduleState",
    "active_stage",
    "apply_schedule",
    "check_schedule",
    "ebb_bases",
    "ebb_gain",
    "last_stage",
    "num_stages",
    "stage_start",
]
