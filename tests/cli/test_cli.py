import subprocess
import sys

import numpy as np
import pytest

from sdtm_compile.cli import main


@pytest.mark.unit
def test_demo_prints_the_merge_schedule(capsys):
    assert main(["demo", "--ratios", "0.5", "--steps", "6", "--latent", "32"]) == 0
    out = capsys.readouterr().out
    assert "256 image tokens" in out
    assert "structure@0.7" in out
    assert "detail@" in out
    assert "PSNR" in out
    assert "cosine" in out
    rows = [line for line in out.splitlines() if line.strip()[:1].isdigit() and "@" in line]
    assert len(rows) == 6


@pytest.mark.slow
def test_demo_on_the_trained_testbed_prints_image_measures(capsys):
    assert main(["demo", "--model", "testbed-1024", "--ratios", "0.5", "--steps", "4", "--latent", "32"]) == 0
    out = capsys.readouterr().out
    assert "testbed-1024" in out
    assert "256 image tokens" in out
    assert "guidance 3.0" in out
    assert "final image vs unmerged: PSNR" in out
    assert "SSIM" in out


@pytest.mark.slow
def test_bad_cli_input_is_a_clear_error(capsys):
    # one real process (the console entry's exit code and stderr); the other cases in this process
    result = subprocess.run(
        [sys.executable, "-m", "sdtm_compile", "demo", "--ratios", "0.9"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "SDTMConfig.ratio=0.9 is invalid" in result.stderr
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--ratios", "a,b"])
    assert exit_info.value.code == 2
    assert "comma-separated ratios" in capsys.readouterr().err
    assert main(["demo", "--model", "tiny-flux"]) == 2  # the demo runs SD3 presets
    with pytest.raises(SystemExit, match="unknown token-reduction method 'tome'"):
        main(["lint", "--method", "tome"])


@pytest.mark.slow
def test_lint_command_reports_every_bucket(capsys):
    assert main(["lint", "--latent", "32"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if "aten ops" in line]
    assert all(line.endswith("OK") for line in rows)
    # one row per distinct graph: on a 16x16 grid both structure buckets merge the same number of windows
    assert [row.split("  ")[0] for row in rows] == [
        "full",
        *(f"detail@{b}" for b in ("0.3", "0.4", "0.5", "0.6")),
        "structure@0.6, structure@0.7",
    ]


@pytest.mark.unit
def test_lint_command_takes_another_method(capsys):
    assert main(["lint", "--latent", "32", "--method", "toma", "--ratio", "0.4"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "aten ops" in line]
    assert [row.split("  ")[0] for row in rows] == ["full", "merge@0.4"]
    assert all(r.endswith("OK") for r in rows)


@pytest.mark.onnx
def test_export_and_export_triton_commands(tmp_path, capsys):
    import json

    bundle, repository = tmp_path / "bundle", tmp_path / "repository"
    # ToMeSD: two engines (an export costs ~10 s each; SDTM's export is tests/deploy/test_export.py's), and a method
    # whose initial state is seeded random numbers, not zeros
    assert main(["export", "--out", str(bundle), "--latent", "32", "--method", "tomesd", "--ratio", "0.3"]) == 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert [e["key"] for e in manifest["engines"]] == ["full", "merge@0.3"]
    printed = capsys.readouterr().out
    assert "wrote 2 files" in printed and "weights.bin" in printed and "model.onnx" in printed
    assert "merge@0.3       graph 1" in printed
    assert main(["export-triton", str(bundle), str(repository), "--max-steps", "8", "--engine-instances", "2"]) == 0
    out = capsys.readouterr().out
    assert "sdtm, sdtm_engines" in out
    assert "tritonserver --model-repository" in out
    state = np.load(repository / "sdtm" / "1" / "initial_state.npy")
    assert state.dtype == np.int32
    assert state.shape == (2, 256)
    assert len(np.unique(state)) > 1
    assert 'backend: "onnxruntime"' in (repository / "sdtm_engines" / "config.pbtxt").read_text()
    with pytest.raises(SystemExit, match="export-triton: .*manifest.json: no manifest"):
        main(["export-triton", str(tmp_path / "nowhere"), str(tmp_path / "r2")])
    with pytest.raises(SystemExit, match="export-triton: invalid TritonSettings: pipeline_instances must be >= 1"):
        main(["export-triton", str(bundle), str(tmp_path / "r3"), "--pipeline-instances", "0"])
