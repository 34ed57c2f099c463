"""Progressive initialization and the EBB switch, as pure functions of the step number."""

from binarydm.schedule.progressive import active_stage, apply_schedule, num_stages

__all__ = ["active_stage", "apply_schedule", "num_stages"]
