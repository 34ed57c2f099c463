"""Progress bars of a worker's long phases (training, sampling), with rate and ETA.

``ray.experimental.tqdm_ray`` bars: inside a Ray worker they travel to the driver as
log lines, which ``bdm-search`` shows where no live table does (the teacher's
pretraining, ``bdm-search trial``); in the driver itself they draw directly.
"""

from __future__ import annotations


def progress_bar(label: str, total: int, start: int = 0, unit: str = "it"):
    """A bar of ``total`` units named ``label``, already at ``start``."""
    from ray.experimental.tqdm_ray import tqdm

    bar = tqdm(total=total, desc=label, unit=unit)
    if start:
        bar.update(start)
    return bar
