"""The example scripts run for real (tiny components built from config, no downloads)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.unit
def test_sd3_pipeline_with_the_compiled_transformer_makes_an_image(tmp_path):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from sd3_pipeline import generate, tiny_sd3_pipeline
    finally:
        sys.path.pop(0)
    from sdtm_compile.compiler.backend import SDTMBackend

    pipe = tiny_sd3_pipeline()
    pipe.set_progress_bar_config(disable=True)
    backend = SDTMBackend({"engine": "eager", "history": 16})
    torch._dynamo.reset()  # earlier tests compiled SD3Transformer2DModel.forward with other shapes
    pipe.transformer = torch.compile(pipe.transformer, backend=backend, dynamic=False)
    with torch.no_grad():
        image = generate(pipe, steps=4, size=64, seed=0)
    assert image.size == (64, 64)
    history = backend.compiled[0].dispatcher.history
    assert len(history) == 4
    assert history[0].key.stage.value == "structure"


@pytest.mark.slow
def test_sd3_pipeline_script_prints_times_and_tokens(tmp_path):
    out = tmp_path / "image.png"
    result = subprocess.run(
        # the eager engine: the script's path end to end without Inductor builds (the README's main job, with
        # Inductor engines, is what the backend tests check engine by engine)
        [
            sys.executable,
            str(ROOT / "examples" / "sd3_pipeline.py"),
            "--steps",
            "3",
            "--size",
            "64",
            "--engine",
            "eager",
            "--out",
            str(out),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SDTM ratio 0.5, backend=sdtm_trt" in result.stdout
    assert "baseline, eager" in result.stdout
    assert "attn tok" in result.stdout
    assert out.exists()
    assert "on ['eager']" in result.stdout  # the engine asked for, not TensorRT's Inductor fallback


@pytest.mark.unit
def test_flux_pipeline_with_the_compiled_transformer_makes_an_image():
    """A real FluxPipeline (FLUX.1-dev's scheduler config: dynamic shifting) drives the SDTM-compiled Flux."""
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from flux_pipeline import generate, tiny_flux_pipeline
    finally:
        sys.path.pop(0)
    import sdtm_compile

    pipe = tiny_flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    torch._dynamo.reset()
    compiled = torch.compile(pipe.transformer, backend="sdtm_trt", dynamic=False, options={"engine": "eager"})
    pipe.transformer = compiled
    with torch.no_grad(), sdtm_compile.generation(compiled, history=8) as run:
        image = generate(pipe, steps=6, height=64, width=96, seed=0)
    assert image.size == (96, 64)
    (graph,) = sdtm_compile.compiled_graphs(compiled)
    assert graph.sites.grid == (8, 12)  # tiny VAE: 4x down, then 2x2 packing
    assert graph.sites.family == "flux"
    keys = [str(record.key) for record in run.history]
    assert len(keys) == 6
    assert keys[0].startswith("structure")
    assert keys[-1].startswith("detail")
    torch._dynamo.reset()
