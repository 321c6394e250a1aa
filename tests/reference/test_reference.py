import pytest
import torch

from sdtm_compile import SDTMConfig
from sdtm_compile.core.merge import MergePlan
from sdtm_compile.core.method import method_for
from sdtm_compile.core.schedule import FULL, EngineKey, Stage
from sdtm_compile.methods.sdtm import SDTMMethod
from sdtm_compile.methods.sdtm.plans import init_li
from sdtm_compile.methods.sdtm.schedule import token_counts
from sdtm_compile.models import TinySpec, example_inputs, tiny_sd3_transformer
from sdtm_compile.reference import BlockCall, reference_forward, sd3_block_forward, token_grid

pytestmark = pytest.mark.unit

CONFIG = SDTMConfig()
LATENTS = [(32, 32), (24, 40)]  # square and non-square (12x20 tokens)


def block_inputs(model, spec, batch, latent_hw):
    inputs = example_inputs(spec, batch, latent_hw)
    with torch.no_grad():
        x = model.pos_embed(inputs["hidden_states"])
        temb = model.time_text_embed(inputs["timestep"], inputs["pooled_projections"])
        context = model.context_embedder(inputs["encoder_hidden_states"])
    return x, context, temb, token_grid(model, inputs["hidden_states"])


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("latent_hw", LATENTS)
@torch.no_grad()
def test_ratio_zero_block_equals_diffusers(tiny_model, batch, latent_hw):
    spec, model = tiny_model
    x, context, temb, grid = block_inputs(model, spec, batch, latent_hw)
    li = init_li(batch, x.shape[1])
    for index, block in enumerate(model.transformer_blocks):  # includes the last, context_pre_only block
        want_context, want_x = block(hidden_states=x, encoder_hidden_states=context, temb=temb)
        call = BlockCall(index, FULL, grid, method_for(CONFIG), "sd3")
        got_context, got_x, got_li = sd3_block_forward(block, x, context, temb, None, li, call)
        torch.testing.assert_close(got_x, want_x, rtol=1e-5, atol=1e-6)
        if block.context_pre_only:
            assert index == len(model.transformer_blocks) - 1
            assert got_context is None
            assert want_context is None
        else:
            torch.testing.assert_close(got_context, want_context, rtol=1e-5, atol=1e-6)
        assert got_li is li
        x, context = want_x, want_context


def test_sd35_spec_really_has_dual_attention(sd35):
    _, model = sd35
    flags = [block.use_dual_attention for block in model.transformer_blocks]
    assert flags == [True, True, False]
    assert model.transformer_blocks[0].attn.norm_q is not None  # qk_norm


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("latent_hw", LATENTS)
@torch.no_grad()
def test_ratio_zero_transformer_equals_diffusers(tiny_model, batch, latent_hw):
    spec, model = tiny_model
    inputs = example_inputs(spec, batch, latent_hw)
    want = model(**inputs, return_dict=False)[0]
    grid = token_grid(model, inputs["hidden_states"])
    got, state = reference_forward(model, **inputs, key=FULL, li=init_li(batch, grid[0] * grid[1]), config=CONFIG)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not state.li.any()


@pytest.mark.parametrize("stage", [Stage.STRUCTURE, Stage.DETAIL])
@torch.no_grad()
def test_merging_stages_run_and_carry_li(tiny_model, stage):
    spec, model = tiny_model
    inputs = example_inputs(spec, 2, (32, 32))
    grid = token_grid(model, inputs["hidden_states"])
    key = EngineKey(stage, 0.5)
    full, _ = reference_forward(model, **inputs, key=FULL, li=init_li(2, 256), config=CONFIG)
    merged, state = reference_forward(model, **inputs, key=key, li=init_li(2, 256), config=CONFIG)
    li = state.li
    assert merged.shape == full.shape
    assert torch.isfinite(merged).all()
    assert not torch.allclose(merged, full)  # merging changes the output ...
    assert torch.nn.functional.cosine_similarity(merged.flatten(), full.flatten(), dim=0) > 0.9  # ... a little
    # li is updated once per block: no counter can exceed the block count
    assert 0 < li.max() <= len(model.transformer_blocks)
    assert token_counts(key, *grid).removed > 0


@torch.no_grad()
def test_structure_stage_merges_attention_and_detail_does_not(sd35):
    """Record the token count each attention/FF module sees."""
    spec, model = sd35
    inputs = example_inputs(spec, 1, (32, 32))
    seen: dict[str, list[int]] = {}
    hooks = []
    for name in ("attn", "attn2", "ff"):
        module = getattr(model.transformer_blocks[0], name)
        hooks.append(
            module.register_forward_pre_hook(
                lambda m, args, kwargs, name=name: seen.setdefault(name, []).append(
                    (kwargs.get("hidden_states") if "hidden_states" in kwargs else args[0]).shape[1]
                ),
                with_kwargs=True,
            )
        )
    try:
        for stage in (Stage.STRUCTURE, Stage.DETAIL):
            key = EngineKey(stage, 0.6)
            reference_forward(model, **inputs, key=key, li=init_li(1, 256), config=CONFIG)
    finally:
        for hook in hooks:
            hook.remove()
    ssm = token_counts(EngineKey(Stage.STRUCTURE, 0.6), 16, 16)
    idm = token_counts(EngineKey(Stage.DETAIL, 0.6), 16, 16)
    assert seen == {
        "attn": [ssm.attention, idm.attention],
        "attn2": [ssm.attention, idm.attention],
        "ff": [ssm.feed_forward, idm.feed_forward],
    }


def test_odd_token_grid_runs():
    spec = TinySpec(num_layers=2)
    model = tiny_sd3_transformer(spec)
    inputs = example_inputs(spec, 2, (18, 22))  # 9 x 11 tokens: odd on both sides
    with torch.no_grad():
        for stage in (Stage.STRUCTURE, Stage.DETAIL):
            out, _ = reference_forward(model, **inputs, key=EngineKey(stage, 0.7), li=init_li(2, 99), config=CONFIG)
            assert out.shape == inputs["hidden_states"].shape


def release_fidm_plan(x, li, grid_h, grid_w, r):
    """The detail-stage plan written the way the release's ``FIDM`` (``TR_SDTM.py``) computes it, as a slot-form
    :class:`MergePlan`: an independent oracle for ours (even grids only, like the release).

    Release steps kept: destination = window argmax of ``li``; a sentinel buffer argsorted into dst|src;
    ``node_max, node_idx = scores.max(dim=-1)``; ``edge_idx = node_max.argsort(dim=-1, descending=True)``
    (no ``a_d`` anywhere); the first ``r`` edges merged into their destination with a plain mean; ``li + 1``
    everywhere, then 0 at the unmerged sources.
    """
    batch, n, channels = x.shape
    hsy, wsx = grid_h // 2, grid_w // 2
    windows = hsy * wsx
    li_windows = li.view(batch, hsy, 2, wsx, 2).permute(0, 1, 3, 2, 4).reshape(batch, hsy, wsx, 4)
    dst_pos = li_windows.argmax(dim=-1, keepdim=True)
    sentinel = torch.zeros(batch, hsy, wsx, 4, dtype=torch.int64).scatter_(3, dst_pos, -1)
    sentinel = sentinel.view(batch, hsy, wsx, 2, 2).transpose(2, 3).reshape(batch, n, 1)
    order = sentinel.argsort(dim=1)
    a_idx, b_idx = order[:, windows:], order[:, :windows]  # sources, destinations
    metric = x / x.norm(dim=-1, keepdim=True)
    a = metric.gather(1, a_idx.expand(-1, -1, channels))
    b = metric.gather(1, b_idx.expand(-1, -1, channels))
    node_max, node_idx = (a @ b.transpose(-1, -2)).max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx, src_idx = edge_idx[:, r:], edge_idx[:, :r]
    dst_idx = node_idx[..., None].gather(1, src_idx)
    unmerged_tokens = a_idx.gather(1, unm_idx)[..., 0]
    kept = unmerged_tokens.shape[1]
    slot = torch.empty(batch, n, dtype=torch.int64)
    slot.scatter_(1, unmerged_tokens, torch.arange(kept).expand(batch, -1))
    slot.scatter_(1, b_idx[..., 0], (kept + torch.arange(windows)).expand(batch, -1))
    slot.scatter_(1, a_idx.gather(1, src_idx)[..., 0], kept + dst_idx[..., 0])
    count = torch.zeros(batch, kept + windows).scatter_add_(1, slot, torch.ones(batch, n))
    new_li = (li + 1).scatter_(1, unmerged_tokens, 0)
    return MergePlan(slot, 1.0 / count), new_li


@pytest.mark.parametrize("spec_name", ["sd3", "sd35"])
@torch.no_grad()
def test_detail_stage_follows_the_release_rule(request, spec_name, monkeypatch):
    """A whole model at a detail-stage bucket, with ``li`` left by two structure-stage calls (non-zero), equals the
    same forward with the release's FIDM rule plugged in."""
    spec, model = request.getfixturevalue(spec_name)
    inputs = example_inputs(spec, 2, (32, 32))
    li = init_li(2, 256)
    for _ in range(2):
        li = reference_forward(model, **inputs, key=EngineKey(Stage.STRUCTURE, 0.7), li=li, config=CONFIG)[1].li
    assert li.any()
    assert (li > 1).any()
    for bucket in (0.3, 0.5):
        key = EngineKey(Stage.DETAIL, bucket)
        ours, our_state = reference_forward(model, **inputs, key=key, li=li, config=CONFIG)
        with monkeypatch.context() as patch:
            count = token_counts(key, 16, 16).removed

            def release_plan(method, key_, x, li_, grid_h, grid_w):
                assert key_ == key
                return release_fidm_plan(x, li_, grid_h, grid_w, count)

            patch.setattr(SDTMMethod, "plan_for", release_plan)
            theirs, their_state = reference_forward(model, **inputs, key=key, li=li, config=CONFIG)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
        assert torch.equal(our_state.li, their_state.li)
