"""Fixed cost of one Ray Train fit: ``TorchTrainer.fit()`` around a function that does nothing.

    python benchmarks/ray_train_fixed_cost.py --repeats 4

Every study trial runs its QAT as one ``TorchTrainer`` fit (controller actor, placement
group, worker actor, process group). This times that frame alone, one worker, no GPU:
``fit()`` to the worker function's first line, the import of the training loop's module
inside the worker, and the function's return to ``fit()``'s return. The worker writes its
wall-clock stamps to a file (a fit's Result keeps no metrics without a checkpoint).
Results in benchmarks/results/gpu_perf.md (study overhead).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def _worker(config: dict) -> None:
    entered = time.time()
    import binarydm.train._loop  # noqa: F401  what a real trial's worker imports first

    Path(config["stamps"]).write_text(f"{entered} {time.time()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    work = Path(tempfile.mkdtemp(prefix="bdm-ray-fit-"))
    ray.init(include_dashboard=False)
    rows = []
    for i in range(args.repeats):
        stamps = work / f"stamps{i}"
        trainer = TorchTrainer(
            _worker,
            train_loop_config={"stamps": str(stamps)},
            scaling_config=ScalingConfig(num_workers=1),
            run_config=RunConfig(storage_path=str(work / "results"), name=f"fit{i}"),
        )
        start = time.time()
        trainer.fit()
        end = time.time()
        entered, imported = map(float, stamps.read_text().split())
        rows.append((entered - start, imported - entered, end - imported, end - start))
        print(
            f"fit {i}: to the worker {rows[-1][0]:.1f} s, loop import {rows[-1][1]:.1f} s, "
            f"back from the worker {rows[-1][2]:.1f} s, total {rows[-1][3]:.1f} s",
            flush=True,
        )
    ray.shutdown()
    medians = [statistics.median(column) for column in zip(*rows, strict=True)]
    print(
        "median: to the worker {:.1f} s, loop import {:.1f} s, back {:.1f} s, "
        "total {:.1f} s".format(*medians)
    )


if __name__ == "__main__":
    main()
