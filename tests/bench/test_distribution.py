"""The multi-scale sliced Wasserstein distance (sdtm_compile.bench.distribution): zero on identical sets, small
between two draws of the same real distribution, growing with blur and noise, refusing bad inputs; the batched
testbed sampling that feeds it (the same images as one-seed generations) and the report over configurations."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from sdtm_compile import SDTMConfig
from sdtm_compile.bench.distribution import (
    distribution_report,
    laplacian_pyramid,
    real_crops,
    sample_testbed,
    sliced_wasserstein,
    swd,
)
from sdtm_compile.models.sampling import diffusers_call, generate
from sdtm_compile.reference import ReferenceTransformer

#: small settings: 16 crops x 64 patches x 128 directions, a fraction of a second a call on one thread
FAST = {"patches_per_image": 64, "projections": 128}


@pytest.fixture(scope="module")
def crops() -> torch.Tensor:
    return real_crops(16, seed=0)


@pytest.fixture(scope="module")
def testbed():
    from sdtm_compile.models.testbed.model import load_testbed

    return load_testbed()


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = int(3 * sigma) + 1
    taps = torch.arange(-radius, radius + 1, dtype=images.dtype)
    kernel = torch.exp(-(taps**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    c = images.shape[1]
    x = F.pad(images, (radius,) * 4, mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


@pytest.mark.unit
def test_the_pyramid_has_the_paper_levels_and_adds_back_up_to_the_images(crops):
    from sdtm_compile.bench.distribution import _upsample

    pyramid = laplacian_pyramid(crops, 3)
    assert [tuple(level.shape) for level in pyramid] == [(16, 3, 64, 64), (16, 3, 32, 32), (16, 3, 16, 16)]
    rebuilt = pyramid[-1]
    for level in reversed(pyramid[:-1]):
        rebuilt = level + _upsample(rebuilt, level.shape[-2:])
    torch.testing.assert_close(rebuilt, crops, atol=1e-5, rtol=0)
    flat = laplacian_pyramid(torch.full((2, 3, 20, 20), 0.25), 2)  # a flat image: no band-pass, the colour kept
    assert flat[0].abs().max() < 1e-6 and torch.allclose(flat[1], torch.full_like(flat[1], 0.25))
    assert swd(crops, crops, **FAST).level_sizes == ((64, 64), (32, 32), (16, 16))  # down to 16 px by default


@pytest.mark.unit
def test_sliced_wasserstein_of_a_shift_in_one_dimension_is_the_shift():
    points = torch.randn(100, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    distance = sliced_wasserstein(points, points + 0.5, 4, torch.Generator().manual_seed(1))
    assert distance == pytest.approx(0.5, abs=1e-12)
    with pytest.raises(ValueError, match="same number of points"):
        sliced_wasserstein(points, points[:50], 4, torch.Generator())


@pytest.mark.unit
def test_identical_sets_give_zero_and_a_seed_gives_the_same_value(crops):
    same = swd(crops, crops.clone(), **FAST)
    assert same.per_level == (0.0, 0.0, 0.0) and same.mean == 0.0
    assert swd(crops, crops.clone() * 0.5 + 0.5, **FAST).mean == pytest.approx(0.0, abs=1e-3)  # [0, 1]: the same
    shuffled = crops[torch.randperm(16, generator=torch.Generator().manual_seed(0))]
    first = swd(crops, shuffled, seed=3, **FAST)
    assert first == swd(crops, shuffled, seed=3, **FAST)  # deterministic
    assert 0 < first.mean < 60  # the same images, other patch positions per image: near the sampling floor


@pytest.mark.unit
def test_two_disjoint_draws_of_real_crops_are_close_compared_with_noise():
    a, b = real_crops(48, seed=1), real_crops(48, seed=2)
    noise = (0.5 * torch.randn(a.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    options = {"patches_per_image": 64, "projections": 256}
    real = swd(a, b, **options)
    against_noise = swd(a, noise, **options)
    assert real.mean < 0.6 * against_noise.mean, (real, against_noise)
    assert all(r < n for r, n in zip(real.per_level, against_noise.per_level))


@pytest.mark.unit
def test_blur_and_noise_move_the_distance_to_the_clean_set_up_monotonically(crops):
    blurred = [swd(crops, gaussian_blur(crops, sigma), **FAST).mean for sigma in (0.5, 1.0, 2.0, 4.0)]
    assert blurred == sorted(blurred) and blurred[0] > 0, blurred
    noise = torch.randn(crops.shape, generator=torch.Generator().manual_seed(1))
    noisy = [swd(crops, crops + std * noise, **FAST).mean for std in (0.05, 0.1, 0.2, 0.4)]
    assert noisy == sorted(noisy) and noisy[0] > 0, noisy


@pytest.mark.unit
def test_bad_inputs_are_refused_saying_what_to_do(crops):
    cases = [
        (crops[0], "add a batch dimension"),
        (crops[:1], "at least 2 images"),
        (crops[:, :, :32], "differ in \\[C, H, W\\]"),
        (crops[:, :1], "differ in \\[C, H, W\\]"),
        (torch.where(torch.arange(64) == 5, float("nan"), crops), "NaN or infinite"),
        ((crops * 100).long(), "floating point"),
        (crops.numpy(), "must be a tensor"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            swd(crops, bad, **FAST)
    with pytest.raises(ValueError, match="smaller than a 7x7 patch; use at most 3 levels"):
        swd(crops, crops, levels=5)
    with pytest.raises(ValueError, match="smaller than one 7x7 patch"):
        swd(crops[:, :, :6, :6], crops[:, :, :6, :6])


@pytest.mark.unit
def test_a_batch_of_seeds_gives_the_one_seed_generations(testbed):
    from sdtm_compile.models.testbed.quality import generation_inputs

    unmerged = diffusers_call(testbed.transformer)
    batched = sample_testbed(testbed, unmerged, [0, 1], steps=3, batch=2, progress=False)
    one_by_one = [generate(unmerged, generation_inputs(testbed, seed), 3, 3.0).clamp(-1, 1) for seed in (0, 1)]
    assert batched.shape == (2, 3, 64, 64)
    torch.testing.assert_close(batched, torch.cat(one_by_one), atol=1e-4, rtol=0)
    merged = diffusers_call(ReferenceTransformer(testbed.transformer, SDTMConfig(ratio=0.5)))  # merge state per row
    torch.testing.assert_close(
        sample_testbed(testbed, merged, [0, 1], steps=3, batch=2, progress=False),
        sample_testbed(testbed, merged, [0, 1], steps=3, batch=1, progress=False),
        atol=1e-4,
        rtol=0,
    )


@pytest.mark.unit
def test_the_report_compares_configs_with_the_real_crops_and_the_unmerged_model(testbed):
    report = distribution_report(
        testbed,
        {"unmerged": None, "sdtm": SDTMConfig(ratio=0.5)},
        seed_sets=((0, 1), (2, 3)),
        steps=2,
        batch=2,
        progress=False,
        **FAST,
    )
    unmerged, sdtm = report.configs["unmerged"], report.configs["sdtm"]
    assert unmerged.swd_unmerged.per_set == (0.0, 0.0) and unmerged.swd_unmerged.mean == 0.0
    assert unmerged.swd_real == report.unmerged_swd_real
    assert unmerged.psnr_db.mean == math.inf and unmerged.ssim.mean == pytest.approx(1.0)
    assert sdtm.config["method"] == "sdtm" and unmerged.config is None
    for values in (report.unmerged_swd_real, sdtm.swd_real, sdtm.swd_unmerged, sdtm.psnr_db, sdtm.ssim):
        assert len(values.per_set) == 2 and all(math.isfinite(v) for v in values.per_set)
        assert values.spread == pytest.approx(max(values.per_set) - min(values.per_set))
    assert sdtm.swd_unmerged.mean > 0 and -1 < sdtm.ssim.mean < 1  # 2 steps: noisy images, SSIM near 0
    assert len(sdtm.swd_real.per_level) == 2 and len(sdtm.swd_real.per_level[0]) == 3
    assert report.settings["seed_sets"] == [[0, 1], [2, 3]] and report.settings["swd"]["levels_used"] == 3
    assert json.loads(json.dumps(report.to_dict()))["configs"]["sdtm"]["name"] == "sdtm"
