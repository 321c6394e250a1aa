"""The benchmark on a tiny model: metrics, FLOP accounting, the report's fields, its page and the results index,
saved results of every layout re-rendering, and no README rewriting."""

import dataclasses
import datetime
import json
import math
import os
from pathlib import Path

import pytest
import torch

from sdtm_compile import SDTMConfig
from sdtm_compile.bench import VARIANTS, BenchConfig, BenchReport, markdown_report, peak_rss, run_benchmark
from sdtm_compile.bench.flops import count_flops
from sdtm_compile.bench.harness import compiler_caches
from sdtm_compile.bench.pages import Page, page_folder, write_page
from sdtm_compile.bench.render import page_of
from sdtm_compile.cli import main
from sdtm_compile.core.config import config_from_dict
from sdtm_compile.models import TINY_SD3, tiny_sd3_transformer
from sdtm_compile.models.sampling import cosine_similarity, generate, make_generation_inputs, psnr
from sdtm_compile.reference import ReferenceTransformer
from tests.helpers import transformer_call

PNG = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).parents[2]
RESULTS = ROOT / "docs" / "results"
#: The results saved before the one report layout, now the sources of their pages.
SAVED = sorted(path for name in ("bench", "methods", "variants") for path in RESULTS.glob(f"*/{name}.json"))
OLD_BENCH_JSON = RESULTS / "2026-12-01-sd3m-1024-bench" / "bench.json"
OLD_LOAD_JSON = RESULTS / "2026-12-02-tiny-sd3-serve" / "load.json"
TODAY = datetime.date.today().isoformat()


@pytest.mark.unit
def test_psnr_and_cosine():
    x = torch.randn(1, 4, 8, 8)
    assert psnr(x, x) == math.inf
    assert cosine_similarity(x, x) == pytest.approx(1.0, abs=1e-12)
    shifted = x + 0.1  # MSE 0.01 against a peak of the reference's range
    peak = float(x.max() - x.min())
    assert psnr(shifted, x) == pytest.approx(10 * math.log10(peak**2 / 0.01), rel=1e-6)
    assert cosine_similarity(-x, x) == pytest.approx(-1.0, abs=1e-12)


@pytest.mark.unit
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
@pytest.mark.unit
def test_bad_bench_config_is_refused(field, value, message):
    kwargs = {"model": "tiny-sd3", field: value}
    with pytest.raises(ValueError, match=message):
        BenchConfig(**kwargs)


@pytest.mark.unit
def test_the_method_is_any_config_and_the_old_keyword_still_works():
    assert BenchConfig(model="tiny-sd3", sdtm=SDTMConfig(ratio=0.3)).method == SDTMConfig(ratio=0.3)
    assert BenchConfig(model="tiny-sd3", method={"method": "tomesd", "ratio": 0.4}).method.method == "tomesd"
    config = BenchConfig(model="tiny-sd3", method=SDTMConfig(ratio=0.5, deviation=0.2))
    assert config.sweep_config(0.7) == SDTMConfig(ratio=0.7, deviation=0.05)  # the method narrows its deviation
    assert dataclasses.replace(config, warmup=2).method == config.method


TOP_FIELDS = {
    "format_version", "kind", "measured_on", "command", "machine", "model", "settings", "method",
    "method_description", "points", "sweep", "schedule", "reference_schedule_matches", "flops", "merge_time_share",
    "targets", "merge_maps", "quality", "not_run", "wall_time_s", "rerendered_on", "source", "files",
}  # fmt: skip
POINT_FIELDS = {
    "name", "description", "config", "seconds", "median_s", "min_s", "max_s", "spread_pct", "runs",
    "speedup_vs_inductor", "speedup_vs_eager", "flops_per_generation", "flop_ratio", "speedup_over_flop_ratio",
    "engines", "psnr_db", "cosine", "peak_rss_mib", "peak_above_start_mib", "build_cold_s", "build_s", "deterministic",
}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    config = BenchConfig(
        model="tiny-sd3", latent=32, steps=4, runs=2, sweep=(0.3, 0.7), sweep_runs=1, engine="eager",
        cold_caches=False, results_dir=str(results),
    )  # fmt: skip
    report = run_benchmark(config)
    return report, page_of(report, results), results


@pytest.mark.slow
def test_json_has_every_field(tiny_result):
    report, page, _ = tiny_result
    text = (page / "result.json").read_text()
    saved = json.loads(text)
    assert isinstance(report, BenchReport)
    assert report.to_json() == text  # the returned report is the file
    assert BenchReport.from_json(text).to_json() == text
    assert TOP_FIELDS == set(saved)
    assert saved["kind"] == "bench"
    assert saved["measured_on"] == TODAY
    assert [p["name"] for p in saved["points"]] == list(VARIANTS)
    for row in saved["points"]:
        assert POINT_FIELDS <= set(row), row["name"]
        assert len(row["seconds"]) == 2
        assert row["min_s"] <= row["median_s"] <= row["max_s"]
        assert row["deterministic"] is True
        if row["peak_rss_mib"] is not None:  # Linux: a generation's peak is above what it started from
            assert row["peak_rss_mib"] >= row["peak_above_start_mib"] >= 0
    points = {p["name"]: p for p in saved["points"]}
    assert points["inductor"]["speedup_vs_inductor"] == pytest.approx(1.0)
    assert points["eager"]["speedup_vs_eager"] == pytest.approx(1.0)
    assert points["eager"]["psnr_db"] in (None, math.inf)
    for name in ("inductor", "sdtm"):  # compiled variants have compile times
        assert points[name]["build_cold_s"] > 0
        assert points[name]["build_s"] > 0
    assert points["sdtm"]["config"] == SDTMConfig().to_dict()
    assert points["eager"]["config"] is None
    assert set(saved["targets"]) == {
        "sdtm_speedup_reaches_0.9x_flop_ratio", "sdtm_faster_than_eager_reference", "sdtm_fidelity_equals_reference"
    }  # fmt: skip
    assert [p["config"]["ratio"] for p in saved["sweep"]] == [0.3, 0.5, 0.7]
    assert [p["config"]["deviation"] for p in saved["sweep"]] == [0.2, 0.2, 0.05]  # kept within ratio +- dev <= 0.75
    assert [p["name"] for p in saved["sweep"]] == ["sdtm@0.3", "sdtm@0.5", "sdtm@0.7"]
    assert len(saved["schedule"]) == 4
    assert saved["reference_schedule_matches"] is True
    assert {"plan_share", "merge_share", "unmerge_share"} <= set(saved["merge_time_share"]["generation"])
    for name in ("schedule", "speedup_vs_fidelity", "merge_maps"):
        assert (page / saved["files"][name]).read_bytes()[:8] == PNG
    assert "| sdtm |" in (page / "index.md").read_text()


@pytest.mark.slow
def test_the_numbers_mean_what_they_say(tiny_result):
    report = tiny_result[0]
    rows = {p.name: p for p in report.points}
    # SDTM merges tokens in this run (structure and detail), so it does fewer FLOPs than the full model
    assert {s.stage for s in report.schedule} == {"structure", "detail"}
    assert rows["sdtm"].flops_per_generation < rows["eager"].flops_per_generation
    assert rows["sdtm"].flop_ratio == rows["reference"].flop_ratio
    assert rows["sdtm"].flop_ratio > 1.0
    sdtm = rows["sdtm"]
    assert sdtm.speedup_over_flop_ratio == pytest.approx(sdtm.speedup_vs_inductor / sdtm.flop_ratio)
    assert rows["sdtm"].engines == [s.engine for s in report.schedule]
    # the main ratio's sweep point is the main measurement, timed beside the same baseline rounds
    main_point = next(p for p in report.sweep if p.ratio == 0.5)
    assert main_point.speedup_vs_inductor == rows["sdtm"].speedup_vs_inductor
    assert main_point.baseline_median_s == rows["inductor"].median_s
    # the eager engines and the reference run the same algorithm: same latent, a finite PSNR against eager
    assert report.targets["sdtm_fidelity_equals_reference"].met
    assert 20.0 < rows["sdtm"].psnr_db < 200.0
    assert rows["sdtm"].cosine < 1.0
    share = report.merge_time_share.generation
    assert 0.0 < share["plan_share"] < 1.0
    assert 0.0 < share["merge_share"] < 1.0
    # the markdown table prints the same numbers
    assert f"{rows['sdtm'].median_s:.2f}" in markdown_report(report)


@pytest.mark.slow
def test_bucket_graph_flops_add_up_to_a_whole_generation(tiny_result):
    """FLOPs per step come from the bucket graphs; counting a whole eager generation must give the same sum."""
    report = tiny_result[0]
    model = tiny_sd3_transformer(TINY_SD3)
    inputs = make_generation_inputs(TINY_SD3, (32, 32), seed=0)
    config = config_from_dict(report.method)

    def eager(h, e, p, t):
        return model(hidden_states=h, encoder_hidden_states=e, pooled_projections=p, timestep=t, return_dict=False)[0]

    with torch.no_grad():
        full, _ = count_flops(generate, eager, inputs, num_steps=4)
        merged, _ = count_flops(generate, transformer_call(ReferenceTransformer(model, config)), inputs, num_steps=4)
    assert full.total == report.flops.per_generation["full"]
    assert merged.total == report.flops.per_generation["sdtm"]
    assert merged.total == report.point("sdtm").flops_per_generation


@pytest.mark.slow
def test_the_page_names_the_date_and_the_machine_and_the_index_lists_it(tiny_result):
    report, page, results = tiny_result
    assert page.parent == results
    assert page.name == f"{TODAY}-tiny-sd3-bench"
    text = (page / "index.md").read_text()
    assert f"Measured on {TODAY} on {report.machine.cpu}" in text
    assert f"torch {torch.__version__}" in text
    assert f"{report.machine.cores} cores" in text
    assert "Re-rendered" not in text
    assert "![merge_maps](merge_maps.png)" in text
    index = (results / "index.md").read_text()
    assert f"]({page.name}/index.md)" in index
    assert json.loads((page / "page.json").read_text())["measured_on"] == TODAY


@pytest.mark.slow
def test_cli_rerenders_a_saved_result_and_leaves_the_readme_alone(tiny_result, tmp_path, monkeypatch, capsys):
    _, page, _ = tiny_result
    monkeypatch.chdir(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n## Results\n<!-- bench:start -->\nstale table\n<!-- bench:end -->\n")
    before = readme.read_text()
    assert main(["bench", "--from-json", str(page / "result.json"), "--results", "again"]) == 0
    assert readme.read_text() == before
    again = tmp_path / "again" / page.name  # the page keeps its folder name: the date measured, model, kind
    text = (again / "index.md").read_text()
    assert f"Measured on {TODAY}" in text
    assert f"Re-rendered on {TODAY} from `{page / 'result.json'}`" in text
    assert (again / "speedup_vs_fidelity.png").read_bytes()[:8] == PNG
    assert f"]({page.name}/index.md) (re-rendered {TODAY})" in (tmp_path / "again" / "index.md").read_text()
    assert "speed-up vs Inductor" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--update-readme is gone"):
        main(["bench", "--from-json", str(page / "result.json"), "--update-readme", "README.md"])
    assert readme.read_text() == before


@pytest.mark.unit
def test_no_code_rewrites_the_readme():
    assert not (ROOT / "sdtm_compile" / "bench" / "readme.py").exists()
    for path in (ROOT / "sdtm_compile").rglob("*.py"):
        text = path.read_text()
        assert "update_readme" not in text, path  # the functions that rewrote it (and their callers) are gone
        assert "bench:start" not in text, path  # the markers of the README block they rewrote


@pytest.mark.unit
def test_cold_caches_leave_the_environment_alone(tmp_path):
    """The engine cache goes to the backend as its cache_dir option, not through $SDTM_CACHE_DIR."""
    before = os.environ.get("SDTM_CACHE_DIR")
    with compiler_caches(True, tmp_path) as engine_cache:
        assert engine_cache == tmp_path / "sdtm"
        assert os.environ.get("SDTM_CACHE_DIR") == before
    with compiler_caches(False, tmp_path) as engine_cache:
        assert engine_cache is None


@pytest.mark.unit
def test_a_bench_json_of_before_reads_into_the_report():
    """The layout of the first release (``format_version`` 1) reads back number for number."""
    old = json.loads(OLD_BENCH_JSON.read_text())
    report = BenchReport.from_dict(old)
    assert report.kind == "bench"
    assert report.measured_on is None  # not recorded then: the page's date comes from --measured-on
    assert [p.name for p in report.points] == list(old["variants"])
    for point in report.points:
        row = old["variants"][point.name]
        assert point.seconds == row["seconds"]
        assert point.median_s == row["median_s"]
        assert point.speedup_vs_inductor == row["speedup_vs_inductor"]
        assert point.flop_ratio == row["flop_ratio"]
        assert point.build_s == row["build_warm_s"]
        assert point.psnr_db == row["psnr_db"]
    assert [p.ratio for p in report.sweep] == [p["ratio"] for p in old["sweep"]]
    assert [p.config["deviation"] for p in report.sweep] == [p["deviation"] for p in old["sweep"]]
    assert [p.speedup_vs_inductor for p in report.sweep] == [p["speedup_vs_inductor"] for p in old["sweep"]]
    assert {name: t.to_dict() for name, t in report.targets.items()} == old["targets"]
    assert report.flops.to_dict() == {**old["flops"], "linear_ratio": None}  # saved before the linear-only ratio
    assert [s.to_dict() for s in report.schedule] == old["schedule"]
    assert set(report.merge_maps) == {int(step) for step in old["merge_maps"]}
    assert report.settings.to_dict() == {**old["bench"], "step_threshold": None}
    assert BenchReport.from_json(report.to_json()).to_json() == report.to_json()
    assert markdown_report(report) == markdown_report(old)
    for row in old["variants"].values():  # before peak_above_start_mib was recorded
        del row["peak_above_start_mib"]
    assert "(+n/a)" in markdown_report(old)
    with pytest.raises(ValueError, match="field 'variants' is missing"):
        BenchReport.from_dict({k: v for k, v in old.items() if k != "variants"})
    with pytest.raises(ValueError, match="not a benchmark result"):
        BenchReport.from_dict({"model": "tiny-sd3"})


@pytest.mark.unit
def test_the_saved_results_are_found():
    assert len(SAVED) == 8  # 3 benchmarks, 3 method and 2 variant comparisons: none is skipped unseen below


@pytest.mark.unit
@pytest.mark.parametrize("saved", SAVED, ids=lambda path: path.parent.name)
def test_every_saved_result_is_its_page(saved):
    """Every result saved before the one layout reads back, and its page (result.json, index.md) is what the
    re-render path makes of it: dated from its history and marked re-rendered."""
    assert len(SAVED) == 8  # 3 benchmarks, 3 method and 2 variant comparisons
    report = BenchReport.load(saved)
    page = json.loads((saved.parent / "result.json").read_text())
    assert page["points"] == [p.to_dict() for p in report.points]
    assert page["measured_on"] is not None
    assert page["source"] == saved.name
    assert page["rerendered_on"] is not None
    assert markdown_report(report) in (saved.parent / "index.md").read_text()
    assert saved.parent.name.startswith(f"{page['measured_on']}-{report.model.name}-{report.kind}")


@pytest.mark.unit
def test_serve_bench_rerenders_a_saved_load_run_without_a_server(tmp_path, capsys):
    saved = OLD_LOAD_JSON
    measured_on = saved.parent.name[:10]
    assert main(["serve-bench", "--from-json", str(saved), "--measured-on", measured_on,
                 "--results", str(tmp_path)]) == 0  # fmt: skip
    page = tmp_path / f"{measured_on}-tiny-sd3-serve"
    text = (page / "index.md").read_text()
    assert f"Measured on {measured_on} on a machine that was not recorded" in text
    assert f"Re-rendered on {TODAY}" in text
    assert "| grpc | 1 | 16 | 96 |" in text
    assert (page / "load.png").read_bytes()[:8] == PNG
    assert json.loads((page / "result.json").read_text())["results"] == json.loads(saved.read_text())["results"]
    assert f"]({page.name}/index.md)" in (tmp_path / "index.md").read_text()
    assert "throughput" in capsys.readouterr().out


@pytest.mark.unit
def test_a_page_of_another_command_the_same_day_gets_its_own_folder(tmp_path):
    def page(command: str) -> Page:
        return Page("t", "bench", "tiny-sd3", "2026-01-02", None, command, "body")

    first = page_folder(tmp_path, "2026-01-02", "tiny-sd3", "bench", "a")
    write_page(page("a"), first, tmp_path)
    assert page_folder(tmp_path, "2026-01-02", "tiny-sd3", "bench", "a") == first  # the same command: replaced
    second = page_folder(tmp_path, "2026-01-02", "tiny-sd3", "bench", "b")
    assert second.name == "2026-01-02-tiny-sd3-bench-2"
    write_page(page("b"), second, tmp_path)
    index = (tmp_path / "index.md").read_text()
    assert index.count("](2026-01-02-tiny-sd3-bench") == 2
    outside = tmp_path / "elsewhere" / "page"
    write_page(page("c"), outside, tmp_path)  # not a folder of the results: the index is left as it is
    assert (tmp_path / "index.md").read_text() == index


@pytest.mark.slow
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
    assert workload.family == "flux"
    assert workload.grid == (8, 8)
    assert workload.num_blocks == 4
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
    assert set(maps) == {0, 1, 2, 3}
    assert all(set(m) == {0, 3} for m in maps.values())
    assert all(slot.shape == (64,) for m in maps.values() for slot in m.values())
    with pytest.raises(ValueError, match="block indices below 4"):
        BenchConfig(model="tiny-flux", merge_map_blocks=(4,))
