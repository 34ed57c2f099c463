"""Two-process (gloo) checks that DDP ranks fed different data stay bit-identical.

One spawn of two ranks serves every test here (starting processes dominates the
cost): each rank binarizes a seed-0 UNet and runs it on its own batch (LSQ step
inits are all-reduced), then runs LRM on its own batch (the projection is
computed on rank 0 and broadcast). The parent compares what the ranks saved.
"""

from __future__ import annotations

import copy
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from diffusers import UNet2DModel

from binarydm.distill import LowRankMimicking, lrm_rank, pca_basis
from binarydm.quant import BinaryDMConfig, LRMConfig, binarize_

WORLD_SIZE = 2
FIRST_ACT_STEP = "down_blocks.0.resnets.0.conv1.act_quantizer.step"


def small_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=16,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
    )


def rank_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A different noisy batch on every rank, as a DistributedSampler would give."""
    generator = torch.Generator().manual_seed(1000 + rank)
    return torch.randn(2, 3, 16, 16, generator=generator), torch.randint(
        0, 1000, (2,), generator=generator
    )


def binarized_after_one_forward(rank: int) -> UNet2DModel:
    model = binarize_(small_unet(), BinaryDMConfig())
    with torch.no_grad():
        model(*rank_batch(rank))
    return model


def _rank_main(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # two ranks share two cores
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=timedelta(seconds=60),
    )
    try:
        out = Path(out_dir)
        torch.save(binarized_after_one_forward(rank).state_dict(), out / f"binarized{rank}.pt")

        teacher = small_unet()
        student = binarize_(copy.deepcopy(teacher), BinaryDMConfig())
        lrm = LowRankMimicking(student, teacher, LRMConfig())
        x_t, t = rank_batch(rank)
        student(x_t, t)
        lrm.teacher_forward(x_t, t)
        local = {
            block: pca_basis(feature, lrm_rank(feature.shape[1], 4))
            for block, feature in lrm.teacher_recorder.features.items()
        }
        terms = lrm.loss(step=0)
        torch.save(
            {"projection": lrm.state_dict(), "local": local, "loss": terms.unweighted.detach()},
            out / f"lrm{rank}.pt",
        )
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_outputs(tmp_path_factory) -> list[dict[str, dict]]:
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_rank_main, args=(str(out / "rendezvous"), str(out)), nprocs=WORLD_SIZE, join=True)
    return [
        {
            "binarized": torch.load(out / f"binarized{rank}.pt"),
            "lrm": torch.load(out / f"lrm{rank}.pt"),
        }
        for rank in range(WORLD_SIZE)
    ]


def assert_bit_identical(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> None:
    assert list(left) == list(right)
    different = [key for key in left if not torch.equal(left[key], right[key])]
    assert different == []


@pytest.mark.timeout(120)
def test_ranks_with_different_data_share_one_lrm_projection(rank_outputs):
    rank0, rank1 = (outputs["lrm"] for outputs in rank_outputs)
    assert_bit_identical(rank0["projection"], rank1["projection"])
    assert int(rank0["projection"]["projection.updated_step"]) == 0
    # Each rank's own data gives another basis: only the broadcast makes them agree,
    # and what they agree on is rank 0's.
    for block, local0 in rank0["local"].items():
        key = f"projection.{block.replace('.', '_')}"
        assert torch.equal(rank0["projection"][key], local0)
        assert not torch.equal(local0, rank1["local"][block])
    # Same projection, different data: the losses themselves still differ per rank.
    assert rank0["loss"].item() > 0 and rank1["loss"].item() > 0
    assert rank0["loss"].item() != rank1["loss"].item()


@pytest.mark.timeout(120)
def test_ranks_with_different_data_binarize_identically(rank_outputs):
    rank0, rank1 = (outputs["binarized"] for outputs in rank_outputs)
    assert_bit_identical(rank0, rank1)
    assert all(bool(v) for k, v in rank0.items() if k.endswith("initialized"))
    # Without the all-reduce each rank would init its steps from its own batch; the
    # first quantized layer's input is FP, so its shared step is the two ranks' mean.
    alone = [binarized_after_one_forward(rank).state_dict() for rank in range(WORLD_SIZE)]
    assert not torch.equal(alone[0][FIRST_ACT_STEP], alone[1][FIRST_ACT_STEP])
    mean_step = (alone[0][FIRST_ACT_STEP] + alone[1][FIRST_ACT_STEP]) / 2
    torch.testing.assert_close(rank0[FIRST_ACT_STEP], mean_step, rtol=1e-5, atol=0)
