"""The per-call benchmark of the real architectures (what ``sdtm-compile bench`` runs for them): one process per
build, first calls cold and warm, a time per engine a generation reaches, and its page."""

import json

import pytest

from sdtm_compile.cli import main


@pytest.mark.slow
def test_bench_of_a_real_architecture_times_first_calls_and_each_stage(tmp_path, capsys):
    out = tmp_path / "page"
    argv = ["bench", "--model", "sd3-medium", "--layers", "1", "--latent", "8", "--steps", "4", "--runs", "1"]
    assert main([*argv, "--engine", "eager", "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert (result["kind"], result["model"], result["layers"], result["dtype"]) == ("calls", "sd3-medium", 1, "float32")
    assert result["tokens"] == {"image": 16, "text": 333}
    keys = None
    for variant in ("inductor", "sdtm"):
        row = result["rows"][variant]
        assert row["cold_first_call_s"] > 0 and row["first_call_s"] > 0
        assert row["peak_rss_mib"] >= row["model_mib"] > 0
        assert all(call["s"] > 0 for call in row["per_call"].values())
        keys = keys or list(row["per_call"])
        assert list(row["per_call"]) == keys  # both timed at the same engines' timesteps
    assert keys[0].startswith("structure@") and any(key.startswith("detail@") for key in keys)
    page = (out / "index.md").read_text()
    assert "first call cold s" in page and "| inductor |" in page and "| sdtm |" in page
    assert f"| {keys[0]} (t=1000) |" in page
    assert "first call cold s" in capsys.readouterr().out
