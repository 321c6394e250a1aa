"""The variant comparison's harness (sdtm_compile.bench.variants) on a tiny model with eager engines: every variant
measured or reported as not run, the calibrated SDTM* threshold, the report files. Speed is not asserted."""

import json

import pytest

from sdtm_compile.bench import BenchConfig
from sdtm_compile.bench.variants import run_variant_comparison


@pytest.mark.filterwarnings("ignore")
def test_a_variant_run_measures_every_variant_or_says_why_not(tmp_path):
    config = BenchConfig(model="tiny-sd3", latent=32, steps=4, sweep_runs=1, engine="eager", out_dir=str(tmp_path))
    only = ("sdtm", "sdtm+fusion", "sdtm+fbcache")  # CI's budget: the peers ran in the benchmarks (README)
    result = run_variant_comparison(config, step_threshold=0.3, only=only)
    names = [p.name for p in result.points]
    assert names == ["eager", "inductor", "sdtm", "sdtm+fusion", "sdtm+fbcache"] and result.not_run == {}
    points = {p.name: p for p in result.points}
    assert points["eager"].psnr_db == float("inf") and points["eager"].flop_ratio == 1.0
    fusion = points["sdtm+fusion"]
    assert (fusion.merged_steps, fusion.unmerged_steps, fusion.skipped_steps) == (2, 2, 0)  # steps 0 and 3 protected
    assert fusion.state_mib > 0 and points["sdtm"].state_mib == 0
    assert points["sdtm+fbcache"].flop_ratio >= points["sdtm"].flop_ratio * 0.99  # skipped steps only add
    for p in result.points:
        assert p.median_s > 0 and p.runs == 1 and p.speedup_vs_inductor > 0
        if p.merged_steps is not None:
            assert p.merged_steps + p.unmerged_steps + p.skipped_steps == 4
    saved = json.loads((tmp_path / "variants.json").read_text())
    assert [p["name"] for p in saved["points"]] == names
    assert (tmp_path / "variants.png").stat().st_size > 0 and "| sdtm+fusion |" in (
        tmp_path / "variants.md"
    ).read_text()
