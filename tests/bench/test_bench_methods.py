"""The method comparison (`sdtm-compile bench --methods`) on a tiny model with eager engines: every point's fields,
its page, and the CLI's checks. Speed is never asserted."""

import json

import pytest

from sdtm_compile.bench import BenchConfig, BenchReport, markdown_report
from sdtm_compile.bench.compare_methods import method_config, run_method_comparison
from sdtm_compile.bench.measures import pareto_front
from sdtm_compile.bench.render import page_of
from sdtm_compile.cli import main
from sdtm_compile.methods import SiToConfig, ToMAConfig, ToMeSDConfig
from sdtm_compile.methods.sdtm.config import SDTMConfig


@pytest.mark.slow
def test_a_comparison_run_records_every_point(tmp_path):
    config = BenchConfig(
        model="tiny-sd3", latent=32, steps=3, sweep=(), sweep_runs=1, engine="eager", cold_caches=False,
        results_dir=str(tmp_path),
    )  # fmt: skip
    methods = ("sdtm", "toma")  # SDTM's schedule (two stages) and a one-stage method; the others differ only in config
    report = run_method_comparison(config, methods, (0.3, 0.5), command="sdtm-compile bench --methods ...")
    assert report.kind == "methods"
    assert [(p.method, p.ratio) for p in report.points] == [(m, r) for m in methods for r in (0.3, 0.5)]
    assert [p.name for p in report.points] == ["sdtm@0.3", "sdtm@0.5", "toma@0.3", "toma@0.5"]
    for point in report.points:
        assert len(point.engines) == 3
        assert point.runs == 1
        assert point.speedup_vs_inductor > 0
        assert point.flop_ratio > 1.0  # every point merges something
        assert point.speedup_over_flop_ratio == pytest.approx(point.speedup_vs_inductor / point.flop_ratio)
        assert point.speedup_vs_inductor == pytest.approx(point.baseline_median_s / point.median_s)
        assert point.psnr_db > 20
        assert point.cosine > 0.99
        assert point.image_psnr_db is None
        assert point.config["method"] == point.method
        assert point.config["ratio"] == point.ratio
        assert point.build_s > 0
    toma = [p for p in report.points if p.method == "toma"]
    assert set(toma[0].engines) == {"merge@0.3"}
    assert toma[1].flop_ratio > toma[0].flop_ratio
    page = page_of(report, tmp_path)
    saved = json.loads((page / "result.json").read_text())
    assert BenchReport.from_dict(saved).to_dict() == report.to_dict()
    assert (page / "methods.png").stat().st_size > 10_000
    table = markdown_report(report)
    assert table in (page / "index.md").read_text()
    assert table.count("\n| ") == 1 + len(report.points)  # the header and one row per point
    assert "| toma@0.5 |" in table
    front = pareto_front(report.points, image=False)
    assert front
    assert all(p in report.points for p in front)
    assert "On the speed / fidelity front" in table
    assert f"]({page.name}/index.md)" in (tmp_path / "index.md").read_text()


@pytest.mark.unit
def test_method_configs_and_cli_checks(tmp_path, capsys):
    assert method_config("tomesd", 0.4) == ToMeSDConfig(ratio=0.4)
    assert method_config("sito", 0.4) == SiToConfig(ratio=0.4)
    assert method_config("toma", 0.4) == ToMAConfig(ratio=0.4)
    assert method_config("sdtm", 0.7) == SDTMConfig(ratio=0.7, deviation=0.05)  # the method's with_ratio rule
    assert method_config("sdtm", 0.3, SDTMConfig(switch_at=0.6)) == SDTMConfig(ratio=0.3, switch_at=0.6)
    assert method_config("toma", 0.3, SDTMConfig(switch_at=0.6)) == ToMAConfig(ratio=0.3)  # another method's base
    with pytest.raises(ValueError, match="unknown method 'tome'"):
        method_config("tome", 0.5)
    with pytest.raises(SystemExit):
        main(["bench", "--model", "tiny-sd3", "--methods", "sdtm,tome", "--results", str(tmp_path)])
    assert "unknown method(s) ['tome']" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"ToMeSDConfig.ratio=0.8 is invalid"):  # before anything is compiled
        main(["bench", "--model", "tiny-sd3", "--methods", "tomesd", "--sweep", "0.8", "--engine", "eager",
              "--results", str(tmp_path)])  # fmt: skip
    assert not any(tmp_path.iterdir())  # nothing ran, nothing was written
