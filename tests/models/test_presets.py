"""The real architectures as presets: their published sizes, truncation, dtype, and the passes finding their blocks
(built truncated to one block on the eager engine: the point is the real structure, not the size)."""

import pytest
import torch

from sdtm_compile import SDTMConfig
from sdtm_compile.models import MODEL_PRESETS, build_model, example_inputs, flux_example_inputs
from sdtm_compile.models.specs import FluxSpec
from sdtm_compile.passes import find_mmdit_blocks
from sdtm_compile.reference import reference_dispatcher
from tests.helpers import capture_dynamo_graph

#: name -> (blocks, hidden, parameters in billions of the diffusers model built from the published config)
PUBLISHED = {
    "sd3-medium": (24, 1536, 2.03),
    "sd3.5-medium": (24, 1536, 2.24),
    "sd3.5-large": (38, 2432, 8.06),
    "flux-dev": (57, 3072, 11.90),
    "flux-schnell": (57, 3072, 11.89),
}


@pytest.mark.unit
@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_have_the_published_sizes(name):
    """Built whole on the meta device (no memory: a 12 B model would take 24 GB in bf16)."""
    preset = MODEL_PRESETS[name]
    blocks, hidden, billions = PUBLISHED[name]
    with torch.device("meta"):
        model = build_model(preset.spec, dtype=torch.bfloat16)
    assert preset.real
    assert (preset.spec.num_blocks, preset.spec.inner_dim) == (blocks, hidden)
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, abs=0.005)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.unit
def test_truncation_keeps_the_architecture():
    sd35 = MODEL_PRESETS["sd3.5-medium"].spec
    assert sd35.truncated(3).dual_attention_layers == (0, 1, 2)
    assert sd35.truncated(20).dual_attention_layers == tuple(range(13))
    flux = MODEL_PRESETS["flux-dev"].spec
    assert (flux.truncated(4).num_layers, flux.truncated(4).num_single_layers) == (4, 0)
    assert (flux.truncated(21).num_layers, flux.truncated(21).num_single_layers) == (19, 2)
    with pytest.raises(ValueError, match="layers=58: keep between 1 and the model's 57 blocks"):
        flux.truncated(58)
    with pytest.raises(ValueError, match="trained weights is built whole"):
        build_model(MODEL_PRESETS["testbed-1024"].spec, layers=2)


@pytest.mark.unit
@pytest.mark.parametrize("name", ["sd3.5-medium", "flux-schnell"])
def test_one_real_block_in_bf16_is_found_and_merged_like_the_reference(name):
    """One block of the real architecture, created in bf16: the passes find it on the real grid, and a merged call
    through the compiled backend (eager engine) equals the eager reference."""
    preset = MODEL_PRESETS[name]
    spec = preset.spec.truncated(1)
    model = build_model(preset.spec, dtype=torch.bfloat16, layers=1)
    if isinstance(spec, FluxSpec):
        inputs = flux_example_inputs(spec, 1, (16, 16), sigma=1.0)
        assert "guidance" not in inputs  # schnell has no guidance embedding
    else:
        inputs = example_inputs(spec, 2, (16, 16), timestep=1000.0)
    inputs = {
        k: v.to(torch.bfloat16) if v.is_floating_point() and not k.endswith("_ids") else v for k, v in inputs.items()
    }
    gm, flat = capture_dynamo_graph(model, inputs)
    sites = find_mmdit_blocks(gm, flat)
    assert len(sites.blocks) == 1 and sites.grid == (8, 8)
    assert (sites.blocks[0].attn2 is not None) is (name == "sd3.5-medium")  # SD3.5-medium's block 0 has attn2
    config = SDTMConfig(ratio=0.5, deviation=0.0, buckets=(0.5,))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="sdtm", options={"method": config, "engine": "eager"}, dynamic=False)
    with torch.no_grad():
        got = compiled(**inputs, return_dict=False)[0]  # timestep 1000 / sigma 1: the structure stage
        want = reference_dispatcher(model, config)(**inputs, return_dict=False)[0]
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0, atol=0)
