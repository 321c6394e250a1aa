"""The variant comparison (sdtm_compile.bench.compare_variants) on a tiny model with eager engines: every variant
measured or reported as not run, the variants the method names through its hook (SDTM: cache fusion, SDTM*,
size-aware attention) with the calibrated SDTM* threshold, the page. Speed is not asserted."""

import json

import pytest
import torch

from sdtm_compile.bench import BenchConfig
from sdtm_compile.bench.compare_variants import run_variant_comparison
from sdtm_compile.bench.render import page_of
from sdtm_compile.core.method import VariantCalibration, method_for
from sdtm_compile.methods import SDTMConfig, ToMeSDConfig
from sdtm_compile.methods.sdtm.variants import calibrate_adaptive_threshold


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_a_variant_run_measures_every_variant_or_says_why_not(tmp_path):
    config = BenchConfig(model="tiny-sd3", latent=32, steps=4, sweep_runs=1, engine="eager", results_dir=str(tmp_path))
    only = ("sdtm", "sdtm+fusion", "sdtm+fbcache")  # CI's budget: the peers ran in the benchmarks (docs/results)
    report = run_variant_comparison(config, step_threshold=0.3, only=only)
    names = [p.name for p in report.points]
    assert report.kind == "variants"
    assert names == ["eager", "inductor", "sdtm", "sdtm+fusion", "sdtm+fbcache"]
    assert report.not_run == {}
    assert report.settings.step_threshold == 0.3
    points = {p.name: p for p in report.points}
    assert points["eager"].psnr_db == float("inf")
    assert points["eager"].flop_ratio == 1.0
    assert points["eager"].speedup_vs_eager == 1.0
    fusion = points["sdtm+fusion"]
    assert (fusion.merged_steps, fusion.unmerged_steps, fusion.skipped_steps) == (2, 2, 0)  # steps 0 and 3 protected
    assert fusion.state_mib > 0
    assert fusion.config["cache_fusion"] is True
    assert points["sdtm"].state_mib == 0
    assert points["sdtm"].config["buckets"] == [0.3, 0.5, 0.7]
    assert points["sdtm+fbcache"].flop_ratio >= points["sdtm"].flop_ratio * 0.99  # skipped steps only add
    for p in report.points:
        assert p.median_s > 0
        assert p.runs == 1
        assert p.speedup_vs_inductor > 0
        if p.merged_steps is not None:
            assert p.merged_steps + p.unmerged_steps + p.skipped_steps == 4
    page = page_of(report, tmp_path)
    saved = json.loads((page / "result.json").read_text())
    assert [p["name"] for p in saved["points"]] == names
    assert (page / "variants.png").stat().st_size > 0
    assert "| sdtm+fusion |" in (page / "index.md").read_text()
    assert "- **sdtm+fusion**: SDTM + cache fusion" in (page / "index.md").read_text()


@pytest.mark.unit
def test_a_method_names_its_variants_through_the_hook():
    plan_inputs = [torch.randn(2, 64, 32) for _ in range(4)]  # 4 steps of an 8x8 token grid
    calls = []

    def first_block_plan_inputs():
        calls.append(1)
        return plan_inputs

    sd3 = VariantCalibration("sd3", (8, 8), 4, first_block_plan_inputs)
    config = SDTMConfig(buckets=(0.3, 0.5, 0.7))
    variants = method_for(config).variants(sd3)
    assert [v.name for v in variants] == ["sdtm+fusion", "sdtm*", "sdtm+size-aware", "sdtm-release-eval"]
    assert len(calls) == 1  # the calibration's generation runs once
    threshold = calibrate_adaptive_threshold(plan_inputs, (8, 8), 4, config)
    assert variants[1].config == SDTMConfig(buckets=(0.3, 0.5, 0.7), adaptive_threshold=threshold)
    assert f"threshold {threshold:.3f}" in variants[1].description
    assert variants[0].config.cache_fusion is True
    assert variants[2].config.size_aware_attention is True
    assert variants[3].config == SDTMConfig.release_eval(buckets=(0.3, 0.5, 0.7))
    flux = VariantCalibration("flux", (8, 8), 4, first_block_plan_inputs)
    assert method_for(config).variants(flux) == []  # SD3-only here
    assert method_for(ToMeSDConfig()).variants(sd3) == []  # the default: no variants
    assert len(calls) == 1
