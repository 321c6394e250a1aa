"""The method comparison (`sdtm-compile bench --methods`) on a tiny model with eager engines: every point's fields,
the files, the README block, and the CLI's checks. Speed is never asserted."""

import json

import pytest

from sdtm_compile.bench import BenchConfig
from sdtm_compile.bench.methods import (
    MethodComparison,
    comparison_markdown,
    method_config,
    pareto_front,
    run_method_comparison,
    update_readme_methods,
)
from sdtm_compile.cli import main
from sdtm_compile.methods import SiToConfig, ToMAConfig, ToMeSDConfig
from sdtm_compile.methods.sdtm.config import SDTMConfig


def test_a_comparison_run_records_every_point(tmp_path):
    config = BenchConfig(
        model="tiny-sd3", latent=32, steps=3, sweep=(), sweep_runs=1, engine="eager", cold_caches=False,
        out_dir=str(tmp_path),
    )  # fmt: skip
    methods = ("sdtm", "toma")  # SDTM's schedule (two stages) and a one-stage method; the others differ only in config
    result = run_method_comparison(config, methods, (0.3, 0.5), command="sdtm-compile bench --methods ...")
    assert [(p.method, p.ratio) for p in result.points] == [(m, r) for m in methods for r in (0.3, 0.5)]
    for point in result.points:
        assert len(point.engines) == 3 and point.runs == 1
        assert point.speedup_vs_inductor > 0 and point.flop_ratio > 1.0  # every point merges something
        assert point.flop_ratio_kept == pytest.approx(point.speedup_vs_inductor / point.flop_ratio)
        assert point.psnr_db > 20 and point.cosine > 0.99 and point.image_psnr_db is None
        assert point.config["method"] == point.method and point.config["ratio"] == point.ratio
    toma = [p for p in result.points if p.method == "toma"]
    assert set(toma[0].engines) == {"merge@0.3"} and toma[1].flop_ratio > toma[0].flop_ratio
    saved = json.loads((tmp_path / "methods.json").read_text())
    assert MethodComparison.from_dict(saved).to_dict() == result.to_dict()
    assert (tmp_path / "methods.png").stat().st_size > 10_000
    table = (tmp_path / "methods.md").read_text()
    assert table == comparison_markdown(result) and table.count("\n| ") == 1 + len(result.points)
    front = pareto_front(result)
    assert front and all(p in result.points for p in front)
    assert "On the speed / fidelity front" in table

    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- bench-methods-tiny-sd3:start -->\nold\n<!-- bench-methods-tiny-sd3:end -->\ntail\n")
    update_readme_methods(readme, result, tmp_path)
    text = readme.read_text()
    assert "old" not in text and "![methods](methods.png)" in text and text.endswith("tail\n")
    assert "| toma | 0.5 |" in text


def test_method_configs_and_cli_checks(tmp_path, capsys):
    assert method_config("tomesd", 0.4) == ToMeSDConfig(ratio=0.4)
    assert method_config("sito", 0.4) == SiToConfig(ratio=0.4)
    assert method_config("toma", 0.4) == ToMAConfig(ratio=0.4)
    assert method_config("sdtm", 0.7) == SDTMConfig(ratio=0.7, deviation=0.05)  # the sweep's deviation rule
    with pytest.raises(ValueError, match="unknown method 'tome'"):
        method_config("tome", 0.5)
    with pytest.raises(SystemExit):
        main(["bench", "--model", "tiny-sd3", "--methods", "sdtm,tome", "--out", str(tmp_path)])
    assert "unknown method(s) ['tome']" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"ToMeSDConfig.ratio=0.8 is invalid"):  # before anything is compiled
        main(["bench", "--model", "tiny-sd3", "--methods", "tomesd", "--sweep", "0.8", "--engine", "eager"])
