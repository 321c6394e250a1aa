"""The benchmark's parts on a tiny model: metrics, FLOP accounting, the JSON's fields, pictures, the CLI."""

import json
import math
import os
from pathlib import Path

import pytest
import torch

from sdtm_compile import SDTMConfig
from sdtm_compile.bench import VARIANTS, BenchConfig, BenchResult, markdown_report, peak_rss, run_benchmark
from sdtm_compile.bench.flops import count_flops
from sdtm_compile.bench.harness import compiler_caches
from sdtm_compile.bench.readme import update_readme
from sdtm_compile.cli import main
from sdtm_compile.models import TINY_SD3, tiny_sd3_transformer
from sdtm_compile.models.sampling import cosine_similarity, generate, make_generation_inputs, psnr
from sdtm_compile.reference import ReferenceTransformer
from tests.helpers import transformer_call

PNG = b"\x89PNG\r\n\x1a\n"
EXAMPLE_JSON = Path(__file__).parents[1] / "examples" / "bench_results" / "bench.json"


def test_psnr_and_cosine():
    x = torch.randn(1, 4, 8, 8)
    assert psnr(x, x) == math.inf and cosine_similarity(x, x) == pytest.approx(1.0, abs=1e-12)
    shifted = x + 0.1  # MSE 0.01 against a peak of the reference's range
    peak = float(x.max() - x.min())
    assert psnr(shifted, x) == pytest.approx(10 * math.log10(peak**2 / 0.01), rel=1e-6)
    assert cosine_similarity(-x, x) == pytest.approx(-1.0, abs=1e-12)


def test_peak_rss_reads_a_growing_peak():
    read = peak_rss()
    before = read()
    if before is None:
        pytest.skip("no /proc/self/clear_refs here (not Linux)")
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    assert read() >= before + 60
    del block


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("model", "sd9", "unknown model 'sd9'"),
        ("runs", 0, "runs=0 is invalid"),
        ("steps", 1, "steps=1 is invalid"),
        ("sweep", (1.5,), "sweep=.* is invalid"),
        ("engine", "tensorrt", "engine='tensorrt' is invalid"),
        ("latent", 7, "latent=7 is invalid"),
        ("merge_map_blocks", (5,), "merge_map_blocks"),
    ],
)
def test_bad_bench_config_is_refused(field, value, message):
    kwargs = {"model": "tiny-sd3", field: value}
    with pytest.raises(ValueError, match=message):
        BenchConfig(**kwargs)


TOP_FIELDS = {
    "format_version", "machine", "command", "model", "sdtm", "bench", "variants", "flops", "schedule",
    "reference_schedule_matches", "merge_time_share", "targets", "sweep", "merge_maps", "wall_time_s", "files",
}  # fmt: skip
VARIANT_FIELDS = {
    "seconds", "median_s", "min_s", "max_s", "spread_pct", "speedup_vs_inductor", "flops_per_generation",
    "flop_ratio", "speedup_over_flop_ratio", "psnr_db", "cosine", "peak_rss_mib", "peak_above_start_mib",
    "build_cold_s", "build_warm_s", "deterministic",
}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    config = BenchConfig(
        model="tiny-sd3", latent=32, steps=4, runs=2, sweep=(0.3, 0.7), sweep_runs=1, engine="eager",
        cold_caches=False, out_dir=str(out),
    )  # fmt: skip
    return run_benchmark(config), out


def test_json_has_every_field(tiny_result):
    result, out = tiny_result
    text = (out / "bench.json").read_text()
    saved = json.loads(text)
    assert isinstance(result, BenchResult) and result.to_json() == text  # the returned result is the file
    assert BenchResult.from_json(text).to_json() == text
    assert TOP_FIELDS <= set(saved)
    assert list(saved["variants"]) == list(VARIANTS)
    for name, row in saved["variants"].items():
        assert VARIANT_FIELDS <= set(row), name
        assert len(row["seconds"]) == 2 and row["min_s"] <= row["median_s"] <= row["max_s"]
        assert row["deterministic"] is True
        if row["peak_rss_mib"] is not None:  # Linux: a generation's peak is above what it started from
            assert row["peak_rss_mib"] >= row["peak_above_start_mib"] >= 0
    assert saved["variants"]["inductor"]["speedup_vs_inductor"] == pytest.approx(1.0)
    assert saved["variants"]["eager"]["psnr_db"] is None or saved["variants"]["eager"]["psnr_db"] == math.inf
    for name in ("inductor", "sdtm"):  # compiled variants have compile times
        assert saved["variants"][name]["build_cold_s"] > 0 and saved["variants"][name]["build_warm_s"] > 0
    assert set(saved["targets"]) == {
        "sdtm_speedup_reaches_0.9x_flop_ratio", "sdtm_faster_than_eager_reference", "sdtm_fidelity_equals_reference"
    }  # fmt: skip
    assert [p["ratio"] for p in saved["sweep"]] == [0.3, 0.5, 0.7]
    assert [p["deviation"] for p in saved["sweep"]] == [0.2, 0.2, 0.05]  # kept within ratio +- dev <= 0.75
    assert len(saved["schedule"]) == 4 and saved["reference_schedule_matches"] is True
    assert {"plan_share", "merge_share", "unmerge_share"} <= set(saved["merge_time_share"]["generation"])
    for name in ("schedule", "speedup_vs_fidelity", "merge_maps"):
        assert (out / saved["files"][name]).read_bytes()[:8] == PNG
    assert "| sdtm |" in (out / "bench.md").read_text()


def test_the_numbers_mean_what_they_say(tiny_result):
    typed, _ = tiny_result
    result = typed.to_dict()
    rows = result["variants"]
    assert typed.variants["sdtm"].flop_ratio == rows["sdtm"]["flop_ratio"] and typed.sweep[0].ratio == 0.3
    # SDTM merges tokens in this run (structure and detail), so it does fewer FLOPs than the full model
    assert {s["stage"] for s in result["schedule"]} == {"structure", "detail"}
    assert rows["sdtm"]["flops_per_generation"] < rows["eager"]["flops_per_generation"]
    assert rows["sdtm"]["flop_ratio"] == rows["reference"]["flop_ratio"] > 1.0
    # the eager engines and the reference run the same algorithm: same latent, a finite PSNR against eager
    assert result["targets"]["sdtm_fidelity_equals_reference"]["met"]
    assert 20.0 < rows["sdtm"]["psnr_db"] < 200.0 and rows["sdtm"]["cosine"] < 1.0
    share = result["merge_time_share"]["generation"]
    assert 0.0 < share["plan_share"] < 1.0 and 0.0 < share["merge_share"] < 1.0
    # the markdown table prints the same numbers
    assert f"{rows['sdtm']['median_s']:.2f}" in markdown_report(result)


def test_bucket_graph_flops_add_up_to_a_whole_generation(tiny_result):
    """FLOPs per step come from the bucket graphs; counting a whole eager generation must give the same sum."""
    result = tiny_result[0].to_dict()
    model = tiny_sd3_transformer(TINY_SD3)
    inputs = make_generation_inputs(TINY_SD3, (32, 32), seed=0)
    config = SDTMConfig.from_dict(result["sdtm"])

    def eager(h, e, p, t):
        return model(hidden_states=h, encoder_hidden_states=e, pooled_projections=p, timestep=t, return_dict=False)[0]

    with torch.no_grad():
        full, _ = count_flops(generate, eager, inputs, num_steps=4)
        merged, _ = count_flops(generate, transformer_call(ReferenceTransformer(model, config)), inputs, num_steps=4)
    assert full.total == result["flops"]["per_generation"]["full"]
    assert merged.total == result["flops"]["per_generation"]["sdtm"]


def test_cli_rerenders_a_saved_result_and_updates_a_readme(tiny_result, tmp_path, capsys):
    _, out = tiny_result
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n## Results\n<!-- bench:start -->\nstale table\n<!-- bench:end -->\n\nafter\n")
    assert main(["bench", "--from-json", str(out / "bench.json"), "--out", str(tmp_path / "again"),
                 "--update-readme", str(readme)]) == 0  # fmt: skip
    text = readme.read_text()
    assert "stale table" not in text and text.endswith("after\n") and "| sdtm |" in text
    assert "![merge_maps](again/merge_maps.png)" in text
    assert (tmp_path / "again" / "speedup_vs_fidelity.png").read_bytes()[:8] == PNG
    assert "speed-up vs Inductor" in capsys.readouterr().out


def test_cold_caches_leave_the_environment_alone(tmp_path):
    """The engine cache goes to the backend as its cache_dir option, not through $SDTM_CACHE_DIR."""
    before = os.environ.get("SDTM_CACHE_DIR")
    with compiler_caches(True, tmp_path) as engine_cache:
        assert engine_cache == tmp_path / "sdtm"
        assert os.environ.get("SDTM_CACHE_DIR") == before
    with compiler_caches(False, tmp_path) as engine_cache:
        assert engine_cache is None


def test_a_saved_result_reads_back_and_renders_the_same():
    """The JSON of a result from an earlier release (the README's) reads back field for field."""
    text = EXAMPLE_JSON.read_text()
    result = BenchResult.from_json(text)
    expected = json.loads(text)
    assert "linear_ratio" not in expected["flops"]  # saved before the linear-only FLOP ratio was recorded
    expected["flops"]["linear_ratio"] = None
    for row in [*expected["variants"].values(), *expected["sweep"]]:  # image measures: pixel-space models only
        row.update(image_psnr_db=None, ssim=None)
    # quality (pixel-space models only) comes after merge_maps
    expected = {**{k: v for k, v in expected.items() if k not in ("wall_time_s", "files")}, "quality": None,
                "wall_time_s": expected["wall_time_s"], "files": expected["files"]}  # fmt: skip
    assert result.to_json() == json.dumps(expected, indent=1)
    assert markdown_report(result) == markdown_report(json.loads(text))
    assert set(result.merge_maps) == {int(step) for step in json.loads(text)["merge_maps"]}
    old = json.loads(text)  # before peak_above_start_mib was recorded
    for row in old["variants"].values():
        del row["peak_above_start_mib"]
    assert "(+n/a)" in markdown_report(old)
    with pytest.raises(ValueError, match="field 'variants' is missing"):
        BenchResult.from_dict({k: v for k, v in old.items() if k != "variants"})


def test_update_readme_needs_the_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\nno results block\n")
    with pytest.raises(ValueError, match="no <!-- bench:start -->"):
        update_readme(readme, BenchResult.load(EXAMPLE_JSON), tmp_path)


def test_flux_workload_drives_flux_generations_and_merge_maps():
    """The Flux benchmark's pieces without timing: FLUX.1-dev's loop (batch 1, guidance embedded, 20 steps by
    default), a probe laid out like that loop's calls, the eager reference and merge maps of every block kind."""
    from sdtm_compile.bench.instrument import record_merge_maps
    from sdtm_compile.bench.workload import make_workload
    from sdtm_compile.models.sampling import flux_generate

    config = BenchConfig(model="tiny-flux", latent=16, steps=None, merge_map_blocks=(0, 3), engine="eager")
    assert (config.steps, config.guidance_scale) == (20, 3.5)
    config = BenchConfig(model="tiny-flux", latent=16, steps=4, merge_map_blocks=(0, 3), engine="eager")
    workload = make_workload(config)
    assert workload.family == "flux" and workload.grid == (8, 8) and workload.num_blocks == 4
    calls = []

    def spy(**kwargs):
        calls.append({k: (tuple(v.shape), v.stride()) for k, v in kwargs.items() if isinstance(v, torch.Tensor)})
        return workload.model(**kwargs)

    latent = workload.generate(workload.call_of(spy), config)
    assert len(calls) == 4
    probe = {k: (tuple(v.shape), v.stride()) for k, v in workload.probe.items() if isinstance(v, torch.Tensor)}
    assert calls[0] == probe  # a compile probed with it serves the generation without recompiling
    assert torch.equal(latent, flux_generate(workload.model, workload.inputs, 4))
    maps = record_merge_maps(workload, config, (0, 3))  # a double (0) and a single-stream (3) block
    assert set(maps) == {0, 1, 2, 3} and all(set(m) == {0, 3} for m in maps.values())
    assert all(slot.shape == (64,) for m in maps.values() for slot in m.values())
    with pytest.raises(ValueError, match="block indices below 4"):
        BenchConfig(model="tiny-flux", merge_map_blocks=(4,))
