"""LRM: feature-point hooks, deterministic PCA projections and the mimicking loss.

Single-process tests on small diffusers UNet2DModels (the 3-level test UNet and
the ``small`` preset, which has ``ddpm-cifar10``'s layout at a quarter of its
width), at both granularities: every timestep-embedded unit and the 2L+1 block
outputs. The two-process DDP checks live in test_lrm_ddp.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from bdm_support import small_unet as support_small_unet
from diffusers import UNet2DModel

from binarydm.distill import (
    FeatureRecorder,
    LowRankMimicking,
    LowRankProjection,
    LRMLoss,
    feature_blocks,
    lrm_rank,
    pca_basis,
)
from binarydm.distill.hooks import feature_points
from binarydm.models import build_unet
from binarydm.quant import BinaryDMConfig, LRMConfig, binarize_

BLOCKS = [
    "down_blocks.0",
    "down_blocks.1",
    "down_blocks.2",
    "mid_block",
    "up_blocks.0",
    "up_blocks.1",
    "up_blocks.2",
]
# (channels, height, width) of each block output for a 2x3x16x16 input.
SHAPES = {
    "down_blocks.0": (16, 8, 8),
    "down_blocks.1": (32, 4, 4),
    "down_blocks.2": (32, 4, 4),
    "mid_block": (32, 4, 4),
    "up_blocks.0": (32, 8, 8),
    "up_blocks.1": (32, 16, 16),
    "up_blocks.2": (16, 16, 16),
}
# The same for every timestep-embedded unit ("unit" granularity), in forward order.
UNIT_SHAPES = {
    "conv_in": (16, 16, 16),
    "down_blocks.0.resnets.0": (16, 16, 16),
    "down_blocks.0.downsamplers.0": (16, 8, 8),
    "down_blocks.1.attentions.0": (32, 8, 8),
    "down_blocks.1.downsamplers.0": (32, 4, 4),
    "down_blocks.2.resnets.0": (32, 4, 4),
    "mid_block": (32, 4, 4),
    "up_blocks.0.resnets.0": (32, 4, 4),
    "up_blocks.0.upsamplers.0": (32, 8, 8),
    "up_blocks.1.attentions.0": (32, 8, 8),
    "up_blocks.1.upsamplers.0": (32, 16, 16),
    "up_blocks.2.resnets.0": (16, 16, 16),
    "up_blocks.2.resnets.1": (16, 16, 16),
}
UNITS = list(UNIT_SHAPES)
POINT_SHAPES = {"level": SHAPES, "unit": UNIT_SHAPES}
POINTS = {"level": BLOCKS, "unit": UNITS}

# ddpm-cifar10 (and the ``small`` preset, its layout at a quarter of the width): the 25
# units the official code hooks (its TimestepEmbedSequentials) and the 9 block outputs.
DDPM_UNITS = [
    "conv_in",
    "down_blocks.0.resnets.0",
    "down_blocks.0.resnets.1",
    "down_blocks.0.downsamplers.0",
    "down_blocks.1.attentions.0",
    "down_blocks.1.attentions.1",
    "down_blocks.1.downsamplers.0",
    "down_blocks.2.resnets.0",
    "down_blocks.2.resnets.1",
    "down_blocks.2.downsamplers.0",
    "down_blocks.3.resnets.0",
    "down_blocks.3.resnets.1",
    "mid_block",
    "up_blocks.0.resnets.0",
    "up_blocks.0.resnets.1",
    "up_blocks.0.upsamplers.0",
    "up_blocks.1.resnets.0",
    "up_blocks.1.resnets.1",
    "up_blocks.1.upsamplers.0",
    "up_blocks.2.attentions.0",
    "up_blocks.2.attentions.1",
    "up_blocks.2.upsamplers.0",
    "up_blocks.3.resnets.0",
    "up_blocks.3.resnets.1",
    "up_blocks.3.resnets.2",
]
DDPM_LEVELS = [
    "down_blocks.0",
    "down_blocks.1",
    "down_blocks.2",
    "down_blocks.3",
    "mid_block",
    "up_blocks.0",
    "up_blocks.1",
    "up_blocks.2",
    "up_blocks.3",
]
# Each block output is also the output of its last unit (a sampler where there is one).
DDPM_LEVEL_UNIT = {
    "down_blocks.0": "down_blocks.0.downsamplers.0",
    "down_blocks.1": "down_blocks.1.downsamplers.0",
    "down_blocks.2": "down_blocks.2.downsamplers.0",
    "down_blocks.3": "down_blocks.3.resnets.1",
    "mid_block": "mid_block",
    "up_blocks.0": "up_blocks.0.upsamplers.0",
    "up_blocks.1": "up_blocks.1.upsamplers.0",
    "up_blocks.2": "up_blocks.2.upsamplers.0",
    "up_blocks.3": "up_blocks.3.resnets.2",
}


def small_unet(seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=16,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
    )


def noisy_batch(seed: int, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x_t = torch.randn(batch, 3, 16, 16, generator=generator)
    t = torch.randint(0, 1000, (batch,), generator=generator)
    return x_t, t


@pytest.fixture(scope="module")
def teacher() -> UNet2DModel:
    return small_unet().eval()


def preset_batch(seed: int, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """A noisy batch for the 32x32 ``small`` preset."""
    generator = torch.Generator().manual_seed(seed)
    x_t = torch.randn(batch, 3, 32, 32, generator=generator)
    t = torch.randint(0, 1000, (batch,), generator=generator)
    return x_t, t


@pytest.fixture(scope="module")
def preset_teacher() -> UNet2DModel:
    torch.manual_seed(0)
    return build_unet("small").eval()


def binarized_student(teacher: UNet2DModel, **dotted) -> UNet2DModel:
    """BinaryDM (the default recipe) of a copy of ``teacher``; conv_in/conv_out FP unless
    ``dotted`` says otherwise (the conv_in unit's expectations depend on it)."""
    student = copy.deepcopy(teacher).requires_grad_(True).train()
    return binarize_(student, BinaryDMConfig().replace(**{"first_last": "fp", **dotted}))


def run_lrm(lrm: LowRankMimicking, batch_seed: int, step: int = 0):
    x_t, t = noisy_batch(batch_seed)
    lrm.student(x_t, t)
    return lrm(x_t, t, step=step)


# -- hooks --------------------------------------------------------------------------


def test_feature_blocks_are_down_mid_up_in_order(teacher):
    assert [name for name, _ in feature_blocks(teacher)] == BLOCKS
    assert dict(feature_blocks(teacher))["mid_block"] is teacher.mid_block
    assert feature_points(teacher, "level") == feature_blocks(teacher)


def test_ddpm_cifar10_has_the_25_official_units_and_9_levels():
    """The golden list: one point per TimestepEmbedSequential of the official LDM UNet."""
    ddpm = build_unet("ddpm-cifar10")
    assert [name for name, _ in feature_points(ddpm, "unit")] == DDPM_UNITS
    assert len(DDPM_UNITS) == 25 and len(set(DDPM_UNITS)) == 25
    assert [name for name, _ in feature_points(ddpm, "level")] == DDPM_LEVELS
    assert [name for name, _ in feature_blocks(ddpm)] == DDPM_LEVELS
    # Each point is the module of that name, not a copy or a neighbour.
    modules = dict(ddpm.named_modules())
    assert all(module is modules[name] for name, module in feature_points(ddpm, "unit"))
    # The small preset differs from ddpm-cifar10 only in width: the same points.
    small = build_unet("small")
    assert [name for name, _ in feature_points(small)] == DDPM_UNITS
    assert [name for name, _ in feature_points(small, "level")] == DDPM_LEVELS


def test_unit_points_of_the_shared_test_unets():
    for unet in (support_small_unet(), small_unet()):
        assert [name for name, _ in feature_points(unet)] == UNITS
        assert [name for name, _ in feature_points(unet, "level")] == BLOCKS
        points = dict(feature_points(unet, "unit"))
        assert points["conv_in"] is unet.conv_in
        assert points["down_blocks.1.attentions.0"] is unet.down_blocks[1].attentions[0]
        assert points["down_blocks.0.downsamplers.0"] is unet.down_blocks[0].downsamplers[0]
        assert points["up_blocks.1.upsamplers.0"] is unet.up_blocks[1].upsamplers[0]
        assert points["up_blocks.2.resnets.1"] is unet.up_blocks[2].resnets[1]


def test_a_unet_without_mid_block_has_no_mid_point():
    unet = UNet2DModel(
        sample_size=16,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        mid_block_type=None,
    )
    units = [
        "conv_in",
        "down_blocks.0.resnets.0",
        "down_blocks.0.downsamplers.0",
        "down_blocks.1.attentions.0",
        "up_blocks.0.attentions.0",
        "up_blocks.0.upsamplers.0",
        "up_blocks.1.resnets.0",
        "up_blocks.1.resnets.1",
    ]
    assert [name for name, _ in feature_points(unet, "level")] == [
        "down_blocks.0",
        "down_blocks.1",
        "up_blocks.0",
        "up_blocks.1",
    ]
    with FeatureRecorder(unet) as recorder, torch.no_grad():
        assert recorder.block_names == units
        unet(*noisy_batch(0))
        assert list(recorder.features) == units


def test_unit_points_refuse_skip_blocks_and_unknown_granularities():
    skip = UNet2DModel(
        sample_size=16,
        block_out_channels=(16, 32),
        down_block_types=("SkipDownBlock2D", "SkipDownBlock2D"),
        up_block_types=("SkipUpBlock2D", "SkipUpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
    )
    assert len(feature_points(skip, "level")) == 5
    with pytest.raises(ValueError, match="granularity='level'"):
        feature_points(skip, "unit")
    with pytest.raises(ValueError, match="granularity"):
        feature_points(small_unet(), "block")


def test_recorder_captures_each_block_output(teacher):
    x_t, t = noisy_batch(0)
    with FeatureRecorder(teacher, granularity="level") as recorder, torch.no_grad():
        out = teacher(x_t, t).sample
        features = dict(recorder.features)
    assert list(features) == BLOCKS
    for name, (c, h, w) in SHAPES.items():
        assert features[name].shape == (2, c, h, w), name
    # The last up block's output is what the UNet head turns into the prediction.
    head = teacher.conv_out(teacher.conv_act(teacher.conv_norm_out(features["up_blocks.2"])))
    torch.testing.assert_close(head, out, rtol=0, atol=0)
    # The hidden state (element 0 of the tuple), not a skip connection of the down block.
    with torch.no_grad():
        temb = teacher.time_embedding(teacher.time_proj(t))
        hidden, _ = teacher.down_blocks[0](teacher.conv_in(x_t), temb)
    torch.testing.assert_close(features["down_blocks.0"], hidden, rtol=0, atol=0)


def test_recorder_captures_each_unit_output(teacher):
    """Unit outputs are the tensors the UNet passes on: the down blocks' skip connections,
    the block outputs at each level's last unit, the inputs of the next resnet."""
    x_t, t = noisy_batch(0)
    skips = {}
    handles = [
        block.register_forward_hook(lambda m, a, out, i=i: skips.__setitem__(i, out[1]))
        for i, block in enumerate(teacher.down_blocks)
    ]
    with (
        FeatureRecorder(teacher) as units,
        FeatureRecorder(teacher, granularity="level") as levels,
        torch.no_grad(),
    ):
        out = teacher(x_t, t).sample
        unit, level = dict(units.features), dict(levels.features)
    for handle in handles:
        handle.remove()
    assert units.block_names == list(unit) == UNITS
    for name, (c, h, w) in UNIT_SHAPES.items():
        assert unit[name].shape == (2, c, h, w), name
    exact = {"rtol": 0, "atol": 0}
    with torch.no_grad():
        temb = teacher.time_embedding(teacher.time_proj(t))
        torch.testing.assert_close(unit["conv_in"], teacher.conv_in(x_t), **exact)
        # The attention unit is the attention applied to its resnet's output.
        down1 = teacher.down_blocks[1]
        attended = down1.attentions[0](down1.resnets[0](unit["down_blocks.0.downsamplers.0"], temb))
        torch.testing.assert_close(unit["down_blocks.1.attentions.0"], attended, **exact)
        # The last up block's second resnet reads its first one and the conv_in skip.
        up2 = teacher.up_blocks[2]
        joined = torch.cat([unit["up_blocks.2.resnets.0"], unit["conv_in"]], dim=1)
        torch.testing.assert_close(
            unit["up_blocks.2.resnets.1"], up2.resnets[1](joined, temb), **exact
        )
    # A down block's skip connections are its units' outputs, in order.
    down_units = [[n for n in UNITS if n.startswith(f"down_blocks.{i}.")] for i in range(3)]
    for i, names in enumerate(down_units):
        assert len(skips[i]) == len(names)
        for name, skip in zip(names, skips[i], strict=True):
            torch.testing.assert_close(unit[name], skip, **exact)
    # Every level's output is its last unit's (the sampler where the level has one).
    last_unit = {"mid_block": "mid_block"}
    for block in BLOCKS[:3] + BLOCKS[4:]:
        last_unit[block] = [n for n in UNITS if n.startswith(f"{block}.")][-1]
    assert last_unit["up_blocks.0"] == "up_blocks.0.upsamplers.0"
    for block, name in last_unit.items():
        torch.testing.assert_close(unit[name], level[block], **exact)
    head = teacher.conv_out(teacher.conv_act(teacher.conv_norm_out(unit["up_blocks.2.resnets.1"])))
    torch.testing.assert_close(head, out, **exact)


@pytest.mark.parametrize("granularity", ["level", "unit"])
def test_recorder_keeps_only_the_latest_forward_and_stops_after_remove(teacher, granularity):
    recorder = FeatureRecorder(teacher, granularity=granularity)
    with torch.no_grad():
        teacher(*noisy_batch(0))
        first = recorder.features["mid_block"].clone()
        teacher(*noisy_batch(1))
    assert list(recorder.features) == POINTS[granularity]
    assert not torch.equal(recorder.features["mid_block"], first)
    recorder.remove()
    assert recorder.features == {}
    with torch.no_grad():
        teacher(*noisy_batch(2))
    assert recorder.features == {}


@pytest.mark.parametrize("granularity", ["level", "unit"])
def test_recorder_unwraps_a_wrapper_with_module(granularity):
    class Wrapper(torch.nn.Module):  # stands in for DistributedDataParallel
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args):
            return self.module(*args)

    model = small_unet()
    with FeatureRecorder(Wrapper(model), granularity) as recorder, torch.no_grad():
        Wrapper(model)(*noisy_batch(0))
        assert list(recorder.features) == POINTS[granularity]


def test_recorder_records_units_by_default(teacher):
    with FeatureRecorder(teacher) as recorder:
        assert recorder.granularity == LRMConfig().granularity == "unit"
        assert recorder.block_names == UNITS


def test_recorder_rejects_a_model_without_blocks():
    with pytest.raises(ValueError, match="down_blocks"):
        FeatureRecorder(torch.nn.Linear(2, 2))


# -- projection -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "divisor", "rank"),
    [(16, 4, 4), (32, 4, 8), (32, 8, 4), (3, 4, 1), (2, 8, 1), (10, 4, 2), (14, 4, 4), (7, 1, 7)],
)
def test_rank_is_rounded_size_over_divisor_at_least_one(size, divisor, rank):
    assert lrm_rank(size, divisor) == rank


@pytest.mark.parametrize("axis", ["channel", "width"])
def test_basis_is_orthonormal_descending_and_sign_fixed(axis):
    feature = torch.randn(3, 12, 5, 20, generator=torch.Generator().manual_seed(0))
    basis = pca_basis(feature, 5, axis)
    size = 12 if axis == "channel" else 20
    assert basis.shape == (size, 5) and basis.dtype == torch.float32
    torch.testing.assert_close(basis.T @ basis, torch.eye(5), rtol=0, atol=1e-5)
    observations = feature.movedim(1 if axis == "channel" else -1, -1).reshape(-1, size)
    variances = (observations - observations.mean(0)).matmul(basis).var(dim=0)
    assert torch.all(variances[:-1] >= variances[1:])
    peaks = basis[basis.abs().argmax(dim=0), torch.arange(5)]
    assert torch.all(peaks > 0)


def test_basis_recovers_known_principal_directions():
    generator = torch.Generator().manual_seed(1)
    directions, _ = torch.linalg.qr(torch.randn(8, 8, generator=generator))
    scales = torch.tensor([10.0, 6.0, 3.0, 1.0, 0.5, 0.3, 0.2, 0.1])
    latent = torch.randn(4000, 8, generator=generator) * scales
    # (4000, 8) observations laid out as a (B=10, C=8, H=20, W=20) feature map.
    feature = (latent @ directions.T).reshape(10, 20, 20, 8).permute(0, 3, 1, 2)
    basis = pca_basis(feature, 2, "channel")
    overlap = (basis.T @ directions[:, :2]).abs()
    torch.testing.assert_close(overlap, torch.eye(2), rtol=0, atol=2e-2)


def test_basis_is_bit_identical_on_repeat_and_independent_of_layout():
    feature = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    first = pca_basis(feature, 4)
    assert torch.equal(first, pca_basis(feature.clone(), 4))
    assert torch.equal(first, pca_basis(feature.contiguous(memory_format=torch.channels_last), 4))


def test_projection_rejects_a_feature_of_another_size():
    projection = LowRankProjection(["mid_block"])
    projection.update({"mid_block": torch.randn(2, 8, 4, 4)}, step=0)
    with pytest.raises(ValueError, match="8"):
        projection.project("mid_block", torch.randn(2, 16, 4, 4))


def test_unknown_axis_is_rejected():
    with pytest.raises(ValueError, match="axis"):
        LowRankProjection(["mid_block"], axis="height")


# -- loss -------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["level", "unit"])
@pytest.mark.parametrize("axis", ["channel", "width"])
def test_loss_is_zero_for_identical_models_and_positive_for_a_binary_student(
    teacher, axis, granularity
):
    config = LRMConfig(axis=axis, weight=1e-4, granularity=granularity)
    shapes = POINT_SHAPES[granularity]
    with LowRankMimicking(copy.deepcopy(teacher), teacher, config) as lrm:
        same = run_lrm(lrm, batch_seed=0)
    assert same.unweighted.item() == 0.0 and same.weighted.item() == 0.0
    with LowRankMimicking(binarized_student(teacher), teacher, config) as lrm:
        terms = run_lrm(lrm, batch_seed=0)
        ranks = {b: lrm.projection.basis(b).shape[1] for b in shapes}
    assert list(terms.per_block) == list(shapes)
    assert terms.unweighted.item() > 1e-4
    # conv_in stays FP (first_last="fp"): on the same input it gives the teacher's output.
    fp_points = {"conv_in"} if granularity == "unit" else set()
    assert all(terms.per_block[b].item() == 0.0 for b in fp_points)
    assert all(value.item() > 0 for b, value in terms.per_block.items() if b not in fp_points)
    torch.testing.assert_close(terms.weighted, terms.unweighted * 1e-4)
    dim = 0 if axis == "channel" else 2
    assert ranks == {b: round(shape[dim] / 4) for b, shape in shapes.items()}


@pytest.mark.parametrize("granularity", ["level", "unit"])
def test_loss_matches_hand_computed_projected_mse(teacher, granularity):
    shapes = POINT_SHAPES[granularity]
    x_t, t = noisy_batch(4)
    student = binarized_student(teacher)
    recorders = FeatureRecorder(student, granularity), FeatureRecorder(teacher, granularity)
    student(x_t, t)
    with torch.no_grad():
        teacher(x_t, t)
    student_feats, teacher_feats = (dict(r.features) for r in recorders)
    loss_fn = LRMLoss(list(shapes), LRMConfig(rank_divisor=8, weight=0.5))
    terms = loss_fn(student_feats, teacher_feats)
    expected = []
    for block in shapes:
        basis = pca_basis(teacher_feats[block], lrm_rank(shapes[block][0], 8))
        project = lambda f, b=basis: torch.einsum("bchw,cr->bhwr", f, b)  # noqa: E731
        expected.append(F.mse_loss(project(student_feats[block]), project(teacher_feats[block])))
    torch.testing.assert_close(terms.unweighted, torch.stack(expected).mean())
    torch.testing.assert_close(terms.weighted, 0.5 * torch.stack(expected).mean())


@pytest.mark.parametrize("granularity", ["level", "unit"])
def test_gradient_reaches_the_student_and_never_the_teacher(granularity):
    unfrozen_teacher = small_unet().train()  # LRM must freeze it and detach its features
    student = binarized_student(unfrozen_teacher)
    config = LRMConfig(weight=1.0, granularity=granularity)
    with LowRankMimicking(student, unfrozen_teacher, config) as lrm:
        terms = run_lrm(lrm, batch_seed=0)
    terms.weighted.backward()
    assert not unfrozen_teacher.training
    assert all(not p.requires_grad and p.grad is None for p in unfrozen_teacher.parameters())
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert len(grads) > 10 and sum(g.abs().sum().item() for g in grads) > 0


def test_loss_detaches_teacher_features_given_directly():
    feature = torch.randn(2, 8, 4, 4)
    teacher_feature = (feature + 0.1).requires_grad_(True)
    student_feature = feature.clone().requires_grad_(True)
    loss_fn = LRMLoss(["mid_block"], LRMConfig(weight=1.0))
    loss_fn({"mid_block": student_feature}, {"mid_block": teacher_feature}).weighted.backward()
    assert teacher_feature.grad is None
    assert student_feature.grad.abs().sum() > 0


@pytest.mark.parametrize("granularity", ["level", "unit"])
def test_projection_is_fixed_after_the_first_batch(teacher, granularity):
    config = LRMConfig(granularity=granularity)
    with LowRankMimicking(binarized_student(teacher), teacher, config) as lrm:
        run_lrm(lrm, batch_seed=0, step=0)
        first = {b: lrm.projection.basis(b).clone() for b in POINTS[granularity]}
        run_lrm(lrm, batch_seed=1, step=500)
        assert all(torch.equal(lrm.projection.basis(b), first[b]) for b in POINTS[granularity])
        assert int(lrm.projection.updated_step) == 0
        # Sanity: batch 1 alone would give a different basis, so the check above can fail.
        lrm.teacher_forward(*noisy_batch(1))
        fresh = pca_basis(lrm.teacher_recorder.features["mid_block"], 8)
        assert not torch.equal(fresh, first["mid_block"])


def test_projection_refreshes_every_refresh_every_steps(teacher):
    with LowRankMimicking(binarized_student(teacher), teacher, LRMConfig(refresh_every=2)) as lrm:
        run_lrm(lrm, batch_seed=0, step=0)
        first = lrm.projection.basis("mid_block").clone()
        run_lrm(lrm, batch_seed=1, step=1)
        assert torch.equal(lrm.projection.basis("mid_block"), first)
        run_lrm(lrm, batch_seed=2, step=2)
        assert not torch.equal(lrm.projection.basis("mid_block"), first)
        assert int(lrm.projection.updated_step) == 2


@pytest.mark.parametrize("granularity", ["level", "unit"])
def test_projection_state_dict_round_trip(teacher, tmp_path, granularity):
    student = binarized_student(teacher)
    config = LRMConfig(refresh_every=10, granularity=granularity)
    with LowRankMimicking(student, teacher, config) as lrm:
        before = run_lrm(lrm, batch_seed=0, step=3)
        torch.save(lrm.state_dict(), tmp_path / "lrm.pt")
    state = torch.load(tmp_path / "lrm.pt")
    keys = {b.replace(".", "_") for b in POINTS[granularity]} | {"updated_step"}
    assert set(state) == {f"projection.{key}" for key in keys}

    with LowRankMimicking(student, teacher, config) as resumed:
        resumed.load_state_dict(state)
        assert resumed.projection.initialized
        for block in POINTS[granularity]:
            assert torch.equal(resumed.projection.basis(block), lrm.projection.basis(block))
        again = run_lrm(resumed, batch_seed=0, step=4)
        torch.testing.assert_close(again.unweighted, before.unweighted, rtol=0, atol=0)
        # Still within refresh_every of step 3 after the reload: no recomputation.
        run_lrm(resumed, batch_seed=5, step=12)
        assert int(resumed.projection.updated_step) == 3
        run_lrm(resumed, batch_seed=5, step=13)
        assert int(resumed.projection.updated_step) == 13


def test_disabled_config_and_mismatched_models_are_rejected(teacher):
    with pytest.raises(ValueError, match="lrm.enabled"):
        LowRankMimicking(copy.deepcopy(teacher), teacher, LRMConfig(enabled=False))
    two_level = UNet2DModel(
        sample_size=16,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
    )
    with pytest.raises(ValueError, match="differ"):
        LowRankMimicking(two_level, teacher, LRMConfig())


def test_loss_before_any_forward_says_what_to_run(teacher):
    with (
        LowRankMimicking(copy.deepcopy(teacher), teacher, LRMConfig()) as lrm,
        pytest.raises(RuntimeError, match="teacher_forward"),
    ):
        lrm.loss(step=0)


@pytest.mark.parametrize("granularity", ["level", "unit"])
def test_compiled_teacher_records_the_same_features_and_keeps_the_module_eager(granularity):
    """``compile_teacher`` (training.compile): the recording hooks run inside the compiled
    teacher, its features equal the eager ones, and ``lrm.teacher`` stays the module."""
    torch._dynamo.reset()
    teacher = small_unet().eval()
    x_t, t = noisy_batch(5)
    config = LRMConfig(granularity=granularity)
    with LowRankMimicking(binarized_student(teacher), teacher, config) as lrm:
        lrm.teacher_forward(x_t, t)
        eager = {k: v.clone() for k, v in lrm.teacher_recorder.features.items()}
        lrm.teacher_recorder.clear()
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        lrm.compile_teacher()
        lrm.teacher_forward(x_t, t)
        compiled = dict(lrm.teacher_recorder.features)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs
        assert lrm.teacher is teacher
    assert list(compiled) == list(eager) == POINTS[granularity]
    for block in POINTS[granularity]:
        torch.testing.assert_close(compiled[block], eager[block], rtol=1e-4, atol=1e-5)


# -- units on the ddpm-cifar10 layout (small preset) ------------------------------


def test_every_unit_of_a_binary_student_is_mimicked_and_trains_every_level(preset_teacher):
    """One forward of student and teacher: 25 units of the teacher's shapes, a finite loss
    whose gradient reaches each level, and each unit's term only what runs before it.
    conv_in at 8 bits: its unit is mimicked too (FP, it would match the teacher's exactly)."""
    student = binarized_student(preset_teacher, first_last="int8")
    x_t, t = preset_batch(0)
    with LowRankMimicking(student, preset_teacher, LRMConfig(weight=1.0)) as lrm:
        assert lrm.projection.block_names == DDPM_UNITS
        student(x_t, t)
        lrm.teacher_forward(x_t, t)
        student_feats = dict(lrm.student_recorder.features)
        teacher_feats = dict(lrm.teacher_recorder.features)
        terms = lrm.loss(step=0)
    assert list(student_feats) == list(teacher_feats) == DDPM_UNITS
    for unit in DDPM_UNITS:
        assert student_feats[unit].shape == teacher_feats[unit].shape, unit
        assert student_feats[unit].requires_grad and not teacher_feats[unit].requires_grad
    assert teacher_feats["up_blocks.2.upsamplers.0"].shape == (2, 64, 32, 32)
    assert list(terms.per_block) == DDPM_UNITS
    assert torch.isfinite(terms.unweighted) and terms.unweighted.item() > 0
    assert all(term.item() > 0 for term in terms.per_block.values())

    def first_conv(prefix: str) -> torch.nn.Parameter:
        return student.get_submodule(f"{prefix}.resnets.0.conv1").weight

    # A unit's term reaches its own layers and none that run after it.
    assert type(student.conv_in).__name__ == "QuantConv2d"  # replaced before the hooks
    conv_in_grad, later = torch.autograd.grad(
        terms.per_block["conv_in"],
        [student.conv_in.weight, first_conv("down_blocks.0")],
        retain_graph=True,
        allow_unused=True,
    )
    assert conv_in_grad.abs().sum() > 0 and later is None
    own, upstream, later = torch.autograd.grad(
        terms.per_block["down_blocks.0.resnets.0"],
        [
            first_conv("down_blocks.0"),
            student.conv_in.weight,
            student.down_blocks[0].resnets[1].conv1.weight,
        ],
        retain_graph=True,
        allow_unused=True,
    )
    assert own.abs().sum() > 0 and upstream.abs().sum() > 0 and later is None
    upsampler, later = torch.autograd.grad(
        terms.per_block["up_blocks.2.upsamplers.0"],
        [
            student.up_blocks[2].upsamplers[0].conv.weight,
            student.up_blocks[3].resnets[0].conv1.weight,
        ],
        retain_graph=True,
        allow_unused=True,
    )
    assert upsampler.abs().sum() > 0 and later is None

    terms.weighted.backward()
    levels = [f"down_blocks.{i}" for i in range(4)] + ["mid_block"]
    levels += [f"up_blocks.{i}" for i in range(4)]
    for level in levels:
        grad = first_conv(level).grad
        assert grad is not None and torch.isfinite(grad).all(), level
        assert grad.abs().sum() > 0, level
    last = student.up_blocks[-1].resnets[-1].conv2.weight.grad
    assert last is not None and last.abs().sum() > 0
    assert student.conv_in.weight.grad.abs().sum() > 0


def test_level_granularity_reproduces_the_per_block_loss(preset_teacher):
    """``granularity="level"`` is the loss over the 9 block outputs, computed by hand with
    plain hooks here; each equals the unit term of that level's last unit."""
    student = binarized_student(preset_teacher)
    x_t, t = preset_batch(1)
    outputs: dict[str, dict[str, torch.Tensor]] = {"student": {}, "teacher": {}}
    handles = []
    for role, model in (("student", student), ("teacher", preset_teacher)):
        for name, block in feature_blocks(model):
            record = lambda m, a, out, r=role, n=name: outputs[r].__setitem__(  # noqa: E731
                n, out[0] if isinstance(out, tuple) else out
            )
            handles.append(block.register_forward_hook(record))
    try:
        with (
            LowRankMimicking(student, preset_teacher, LRMConfig(granularity="level")) as level,
            LowRankMimicking(student, preset_teacher, LRMConfig()) as unit,
        ):
            student(x_t, t)
            level_terms = level(x_t, t)
            unit_terms = unit(x_t, t)  # a second teacher forward, deterministic in eval mode
    finally:
        for handle in handles:
            handle.remove()
    assert list(outputs["teacher"]) == list(level_terms.per_block) == DDPM_LEVELS
    expected = {}
    for block in DDPM_LEVELS:
        teacher_feat = outputs["teacher"][block].detach()
        basis = pca_basis(teacher_feat, lrm_rank(teacher_feat.shape[1], 4))
        expected[block] = F.mse_loss(
            outputs["student"][block].movedim(1, -1) @ basis, teacher_feat.movedim(1, -1) @ basis
        )
        torch.testing.assert_close(level_terms.per_block[block], expected[block], rtol=0, atol=0)
        unit_term = unit_terms.per_block[DDPM_LEVEL_UNIT[block]]
        torch.testing.assert_close(unit_term, level_terms.per_block[block], rtol=0, atol=0)
    mean = torch.stack(list(expected.values())).mean()
    torch.testing.assert_close(level_terms.unweighted, mean, rtol=0, atol=0)
    torch.testing.assert_close(level_terms.weighted, mean * 1e-4, rtol=0, atol=0)
    # The 16 units inside the levels make the unit loss another number.
    assert len(unit_terms.per_block) == 25
    assert unit_terms.unweighted.item() != level_terms.unweighted.item()


def test_projections_of_the_25_units_round_trip_into_a_fresh_mimicking(preset_teacher, tmp_path):
    x_t, t = preset_batch(2)
    with LowRankMimicking(binarized_student(preset_teacher), preset_teacher, LRMConfig()) as lrm:
        lrm.student(x_t, t)
        before = lrm(x_t, t, step=0)
        bases = {unit: lrm.projection.basis(unit).clone() for unit in DDPM_UNITS}
        torch.save(lrm.state_dict(), tmp_path / "lrm.pt")
    state = torch.load(tmp_path / "lrm.pt")
    keys = [f"projection.{unit.replace('.', '_')}" for unit in DDPM_UNITS]
    assert list(state) == [*keys, "projection.updated_step"]
    channels = {unit: basis.shape[0] for unit, basis in bases.items()}
    assert channels["conv_in"] == 32 and channels["mid_block"] == 64
    assert all(basis.shape[1] == lrm_rank(basis.shape[0], 4) for basis in bases.values())

    # A fresh student, teacher and LowRankMimicking, as a resumed run builds them.
    teacher = copy.deepcopy(preset_teacher)
    with LowRankMimicking(binarized_student(teacher), teacher, LRMConfig()) as resumed:
        assert not resumed.projection.initialized
        resumed.load_state_dict(state)
        assert resumed.projection.initialized
        for unit in DDPM_UNITS:
            assert torch.equal(resumed.projection.basis(unit), bases[unit]), unit
        resumed.student(x_t, t)
        again = resumed(x_t, t, step=1)
        assert int(resumed.projection.updated_step) == 0  # fixed: not recomputed at step 1
    torch.testing.assert_close(again.unweighted, before.unweighted, rtol=0, atol=0)
    # Unit bases do not fit a level run: the keys say so instead of a silent mismatch.
    with (
        LowRankMimicking(binarized_student(teacher), teacher, LRMConfig(granularity="level")) as lv,
        pytest.raises(RuntimeError, match="down_blocks_0_resnets_0"),
    ):
        lv.load_state_dict(state)
