"""The tuner on a tiny model with the eager engine: budgets, the search space, a whole run whose JSON torch.compile
and the CLI accept, and a budget nothing meets."""

import json

import pytest
import torch

import sdtm_compile
from sdtm_compile import SDTMConfig, ToMeSDConfig
from sdtm_compile.bench.tune import Candidate, QualityBudget, candidate_space, tune, write_tune_page
from sdtm_compile.cli import main
from sdtm_compile.cli.common import config_values
from sdtm_compile.compiler.settings import BackendSettings
from sdtm_compile.models import TINY_SD3, example_inputs, tiny_sd3_transformer


@pytest.mark.unit
def test_budgets_parse_and_bad_ones_name_the_forms():
    assert QualityBudget.parse("psnr>=28") == QualityBudget("psnr", 28.0)
    assert QualityBudget.parse(" swd <= 1.5 ").met({"swd_added": 1.0})
    assert not QualityBudget.parse("ssim>=0.9").met({"ssim": 0.8})
    for bad, message in (
        ("psnr<=28", "psnr is bounded with >="),
        ("fid<=3", "is not one of 'psnr>=VALUE', 'ssim>=VALUE', 'swd<=VALUE'"),
        ("psnr>=x", "is not one of"),
    ):
        with pytest.raises(ValueError, match=message):
            QualityBudget.parse(bad)


@pytest.mark.unit
def test_the_space_pairs_each_extension_where_it_runs():
    space = {c.name: c for c in candidate_space("sd3", 8, methods=("sdtm", "tomesd"), ratios=(0.5,))}
    assert {"sdtm@0.5", "sdtm@0.5+fusion", "sdtm@0.5[staggered]", "sdtm@0.5[first-unmerged:2]"} <= set(space)
    assert {"unmerged+fbcache0.1", "sdtm@0.5+fbcache0.1", "tomesd@0.5+fbcache0.1"} <= set(space)
    assert not any("fusion" in name and "fbcache" in name for name in space)  # two step caches never together
    assert not any(name.startswith("tomesd") and "fusion" in name for name in space)
    flux = {c.name for c in candidate_space("flux", 4, methods=("sdtm",), ratios=(0.5,))}
    assert "sdtm@0.5+fusion" in flux and not any("fbcache" in name for name in flux)  # the step cache is SD3-only
    assert all(BackendSettings.from_options(c.options()) for c in space.values())


@pytest.mark.unit
def test_a_run_chooses_within_the_budget_and_its_json_compiles(tmp_path):
    candidates = [
        Candidate("sdtm@0.5", SDTMConfig(ratio=0.5)),
        Candidate("tomesd@0.5[pattern:0,1]", ToMeSDConfig(ratio=0.5, blocks="pattern:0,1")),
        Candidate("unmerged+fbcache0.1", SDTMConfig(ratio=0.0, deviation=0.0), step_cache=0.1),
    ]
    result = tune(
        "tiny-sd3", "psnr>=20", candidates=candidates, steps=3, quick_seeds=2, samples=2, batch=2, time_top=2,
        runs=1, engine="eager", progress=False,
    )  # fmt: skip
    assert result.met_budget
    assert result.settings["quick_seeds"] == [10_000, 10_001] and result.settings["seed_sets"] == [[0, 1], [2, 3]]
    evaluations = {e.name: e for e in result.evaluations}
    assert evaluations["sdtm@0.5"].flop_ratio > 1.0 and evaluations["tomesd@0.5[pattern:0,1]"].flop_ratio > 1.0
    assert evaluations["sdtm@0.5"].steps == {"merged": 3, "unmerged": 0, "skipped": 0}
    assert evaluations["unmerged+fbcache0.1"].flop_ratio >= 1.0
    timed = [e for e in result.evaluations if e.speedup is not None]
    assert result.chosen == max(timed, key=lambda e: e.speedup).name
    assert all(e.within_budget and e.full["psnr"] >= 20 for e in timed)
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps(result.to_dict()))
    options = sdtm_compile.load_tuned_options(path)
    assert options == result.options
    model = tiny_sd3_transformer(TINY_SD3, seed=0)
    inputs = example_inputs(TINY_SD3, 2, (32, 32))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="sdtm", dynamic=False, options={**options, "engine": "eager"})
    with torch.no_grad():
        assert compiled(**inputs, return_dict=False)[0].shape == inputs["hidden_states"].shape
    assert config_values(str(path)) == options["method"]  # what `sdtm-compile export --config` reads
    assert main(["passes", "--model", "tiny-sd3", "--config", str(path)]) == 0
    page = write_tune_page(result.to_dict(), tmp_path / "results" / "tune", command="sdtm-compile tune ...")
    text = (page / "index.md").read_text()
    assert f"**Chosen: {result.chosen}**" in text and "| tomesd@0.5[pattern:0,1] |" in text
    assert "tune/index.md" in (tmp_path / "results" / "index.md").read_text()


@pytest.mark.unit
def test_a_budget_nothing_meets_chooses_the_unmerged_model():
    result = tune(
        "tiny-sd3", "psnr>=200", candidates=[Candidate("sdtm@0.5", SDTMConfig(ratio=0.5))], steps=2, quick_seeds=2,
        samples=2, batch=2, runs=1, engine="eager", progress=False,
    )  # fmt: skip
    assert not result.met_budget
    assert result.chosen == "unmerged" and result.options["method"]["ratio"] == 0.0
    with pytest.raises(ValueError, match="ssim needs images.*random weights"):
        tune("tiny-sd3", "ssim>=0.9", candidates=[], progress=False)


@pytest.mark.unit
def test_named_and_bad_configs_on_the_command_line(tmp_path, capsys):
    assert config_values("sdtm-release-eval") == SDTMConfig.release_eval().to_dict()
    assert main(["passes", "--model", "tiny-sd3", "--config", "sdtm-release-eval"]) == 0
    with pytest.raises(SystemExit, match="neither a named config"):
        main(["passes", "--model", "tiny-sd3", "--config", "no-such-config"])
    with pytest.raises(SystemExit, match="--method tomesd contradicts --config sdtm-release-eval"):
        main(["passes", "--model", "tiny-sd3", "--config", "sdtm-release-eval", "--method", "tomesd"])
    with pytest.raises(SystemExit, match="budget 'psnr<28'"):
        main(["tune", "--model", "tiny-sd3", "--budget", "psnr<28"])


@pytest.mark.unit
def test_the_printed_table_leaves_per_set_lists_out():
    """A trained testbed's full measure holds per-seed-set lists beside single numbers (this once crashed the
    command after its page was written)."""
    from sdtm_compile.bench.tune import Evaluation
    from sdtm_compile.cli.tune import summary_table

    full = {"psnr": 31.76, "ssim": 0.955, "swd_added": 1.7, "swd_added_spread": 4.7, "swd_real_per_set": [130.1, 137.9]}
    measured = Evaluation("sdtm@0.7+fusion", {}, 1.35, {}, {"psnr": 33.4}, full, True, 2.1, 1.27)
    quick_only = Evaluation("toma@0.7", {}, 2.32, {}, {"psnr": 21.7})
    lines = summary_table([quick_only, measured])
    assert lines[1].startswith("toma@0.7") and lines[2].startswith("sdtm@0.7+fusion")  # FLOP order
    assert "psnr 31.8 ssim 0.955" in lines[2] and "1.27x" in lines[2]
    assert "130.1" not in lines[2] and "spread" not in lines[2]
