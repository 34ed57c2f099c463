"""LRM: block-feature hooks, deterministic PCA projections and the mimicking loss.

Single-process tests on a small diffusers UNet2DModel; the two-process DDP
checks live in test_lrm_ddp.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
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


def binarized_student(teacher: UNet2DModel) -> UNet2DModel:
    student = copy.deepcopy(teacher).requires_grad_(True).train()
    return binarize_(student, BinaryDMConfig())


def run_lrm(lrm: LowRankMimicking, batch_seed: int, step: int = 0):
    x_t, t = noisy_batch(batch_seed)
    lrm.student(x_t, t)
    return lrm(x_t, t, step=step)


# -- hooks --------------------------------------------------------------------------


def test_feature_blocks_are_down_mid_up_in_order(teacher):
    assert [name for name, _ in feature_blocks(teacher)] == BLOCKS
    assert dict(feature_blocks(teacher))["mid_block"] is teacher.mid_block


def test_recorder_captures_each_block_output(teacher):
    x_t, t = noisy_batch(0)
    with FeatureRecorder(teacher) as recorder, torch.no_grad():
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


def test_recorder_keeps_only_the_latest_forward_and_stops_after_remove(teacher):
    recorder = FeatureRecorder(teacher)
    with torch.no_grad():
        teacher(*noisy_batch(0))
        first = recorder.features["mid_block"].clone()
        teacher(*noisy_batch(1))
    assert list(recorder.features) == BLOCKS
    assert not torch.equal(recorder.features["mid_block"], first)
    recorder.remove()
    assert recorder.features == {}
    with torch.no_grad():
        teacher(*noisy_batch(2))
    assert recorder.features == {}


def test_recorder_unwraps_a_wrapper_with_module():
    class Wrapper(torch.nn.Module):  # stands in for DistributedDataParallel
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args):
            return self.module(*args)

    model = small_unet()
    with FeatureRecorder(Wrapper(model)) as recorder, torch.no_grad():
        Wrapper(model)(*noisy_batch(0))
        assert list(recorder.features) == BLOCKS


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


@pytest.mark.parametrize("axis", ["channel", "width"])
def test_loss_is_zero_for_identical_models_and_positive_for_a_binary_student(teacher, axis):
    config = LRMConfig(axis=axis, weight=1e-4)
    with LowRankMimicking(copy.deepcopy(teacher), teacher, config) as lrm:
        same = run_lrm(lrm, batch_seed=0)
    assert same.unweighted.item() == 0.0 and same.weighted.item() == 0.0
    with LowRankMimicking(binarized_student(teacher), teacher, config) as lrm:
        terms = run_lrm(lrm, batch_seed=0)
        ranks = {b: lrm.projection.basis(b).shape[1] for b in BLOCKS}
    assert terms.unweighted.item() > 1e-4
    assert all(value.item() > 0 for value in terms.per_block.values())
    torch.testing.assert_close(terms.weighted, terms.unweighted * 1e-4)
    dim = 0 if axis == "channel" else 2
    assert ranks == {b: round(SHAPES[b][dim] / 4) for b in BLOCKS}


def test_loss_matches_hand_computed_projected_mse(teacher):
    x_t, t = noisy_batch(4)
    student = binarized_student(teacher)
    recorders = FeatureRecorder(student), FeatureRecorder(teacher)
    student(x_t, t)
    with torch.no_grad():
        teacher(x_t, t)
    student_feats, teacher_feats = (dict(r.features) for r in recorders)
    loss_fn = LRMLoss(BLOCKS, LRMConfig(rank_divisor=8, weight=0.5))
    terms = loss_fn(student_feats, teacher_feats)
    expected = []
    for block in BLOCKS:
        basis = pca_basis(teacher_feats[block], lrm_rank(SHAPES[block][0], 8))
        project = lambda f, b=basis: torch.einsum("bchw,cr->bhwr", f, b)  # noqa: E731
        expected.append(F.mse_loss(project(student_feats[block]), project(teacher_feats[block])))
    torch.testing.assert_close(terms.unweighted, torch.stack(expected).mean())
    torch.testing.assert_close(terms.weighted, 0.5 * torch.stack(expected).mean())


def test_gradient_reaches_the_student_and_never_the_teacher():
    unfrozen_teacher = small_unet().train()  # LRM must freeze it and detach its features
    student = binarized_student(unfrozen_teacher)
    with LowRankMimicking(student, unfrozen_teacher, LRMConfig(weight=1.0)) as lrm:
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


def test_projection_is_fixed_after_the_first_batch(teacher):
    with LowRankMimicking(binarized_student(teacher), teacher, LRMConfig()) as lrm:
        run_lrm(lrm, batch_seed=0, step=0)
        first = {b: lrm.projection.basis(b).clone() for b in BLOCKS}
        run_lrm(lrm, batch_seed=1, step=500)
        assert all(torch.equal(lrm.projection.basis(b), first[b]) for b in BLOCKS)
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


def test_projection_state_dict_round_trip(teacher, tmp_path):
    student = binarized_student(teacher)
    with LowRankMimicking(student, teacher, LRMConfig(refresh_every=10)) as lrm:
        before = run_lrm(lrm, batch_seed=0, step=3)
        torch.save(lrm.state_dict(), tmp_path / "lrm.pt")
    state = torch.load(tmp_path / "lrm.pt")
    keys = {b.replace(".", "_") for b in BLOCKS} | {"updated_step"}
    assert set(state) == {f"projection.{key}" for key in keys}

    with LowRankMimicking(student, teacher, LRMConfig(refresh_every=10)) as resumed:
        resumed.load_state_dict(state)
        assert resumed.projection.initialized
        for block in BLOCKS:
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


def test_compiled_teacher_records_the_same_features_and_keeps_the_module_eager():
    """``compile_teacher`` (training.compile): the recording hooks run inside the compiled
    teacher, its features equal the eager ones, and ``lrm.teacher`` stays the module."""
    torch._dynamo.reset()
    teacher = small_unet().eval()
    x_t, t = noisy_batch(5)
    with LowRankMimicking(binarized_student(teacher), teacher, LRMConfig()) as lrm:
        lrm.teacher_forward(x_t, t)
        eager = {k: v.clone() for k, v in lrm.teacher_recorder.features.items()}
        lrm.teacher_recorder.clear()
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        lrm.compile_teacher()
        lrm.teacher_forward(x_t, t)
        compiled = dict(lrm.teacher_recorder.features)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs
        assert lrm.teacher is teacher
    assert compiled.keys() == eager.keys() == set(BLOCKS)
    for block in BLOCKS:
        torch.testing.assert_close(compiled[block], eager[block], rtol=1e-4, atol=1e-5)
