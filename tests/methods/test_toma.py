"""ToMA's plan: greedy facility location against a plain loop, the soft assignment's invariants, which blocks
make, share or skip a plan (FLUX.1's depth, the tiny models), and the pass's plan nodes."""

import pytest
import torch
import torch.nn.functional as F

from sdtm_compile import ToMAConfig
from sdtm_compile.core.merge import merge, unmerge, window_token_index
from sdtm_compile.methods import method_for
from sdtm_compile.methods.toma import facility_location, toma_destinations_per_tile, toma_plan


def _greedy(similarity: torch.Tensor, picks: int) -> list[int]:
    """Facility location as ToMA's code reads: the largest row sum, then the largest coverage gain."""
    chosen = [int(similarity.sum(-1).argmax())]
    best = similarity[chosen[0]].clone()
    for _ in range(picks - 1):
        gains = [float(torch.relu(similarity[v] - best).sum()) for v in range(len(similarity))]
        chosen.append(max(range(len(gains)), key=lambda v: (gains[v], -v)))
        best = torch.maximum(best, similarity[chosen[-1]])
    return chosen


@pytest.mark.unit
def test_facility_location_equals_the_plain_greedy():
    unit = F.normalize(torch.randn(3, 16, 8), dim=-1)
    similarity = unit @ unit.transpose(-1, -2)
    picks = facility_location(similarity, 6)
    for row in range(3):
        assert picks[row].tolist() == _greedy(similarity[row], 6)


@pytest.mark.unit
def test_soft_plan_invariants():
    grid_h, grid_w, tile = 8, 12, 4
    n = grid_h * grid_w
    x = torch.randn(2, n, 16)
    per_tile = toma_destinations_per_tile(0.5, grid_h, grid_w, tile)
    assert per_tile == (n - n // 2) // 6 == 8
    plan, state = toma_plan(x, torch.zeros(2, n, dtype=torch.int32), grid_h, grid_w, per_tile, tile, 1000.0)
    tiles = window_token_index(grid_h, grid_w, None, tile, tile)
    assert plan.assign.shape == (2, 6, per_tile, 16)
    assert plan.restore.shape == (2, 6, 16, per_tile)
    torch.testing.assert_close(plan.assign.sum(-1), torch.ones(2, 6, per_tile))  # weighted means
    torch.testing.assert_close(plan.restore.sum(-1), torch.ones(2, 6, 16))  # each token a mix of merged ones
    assert torch.equal(plan.order[0], tiles.reshape(-1))
    assert torch.equal(plan.order[0][plan.slot[0]], torch.arange(n))  # slot inverts order
    destinations = plan.members[..., 0].reshape(2, 6, per_tile)
    for t in range(6):  # each destination lies in its own tile
        assert set(destinations[:, t].reshape(-1).tolist()) <= set(tiles[t].tolist())
    constant = torch.ones(2, n, 3) * torch.arange(3.0)
    torch.testing.assert_close(unmerge(merge(constant, plan), plan), constant)  # a constant survives both
    assert int(state.abs().sum()) == 0


@pytest.mark.unit
def test_block_plans_follow_toma_on_flux1_and_scale_to_small_models():
    kinds = ["double"] * 19 + ["single"] * 38  # FLUX.1
    plans = method_for(ToMAConfig()).block_plans(kinds)
    assert plans[:5] == [None] * 5
    assert plans[5:19] == [5] * 14  # double 0-4 unmerged, 5-18 share block 5's plan
    assert plans[19:24] == [None] * 5
    assert plans[24:] == [24] * 33  # single 0-4 unmerged, 5-37 share single 5's
    small = method_for(ToMAConfig()).block_plans(["double"] * 2 + ["single"] * 4)  # flux-1024's depth
    assert small == [None, 1, None, 3, 3, 3]  # round(2 * 5/19) = 1 double, round(4 * 5/38) = 1 single unmerged
    own = method_for(ToMAConfig(share_plan=False, unmerged_double=0)).block_plans(["double"] * 2 + ["single"] * 2)
    assert own == [0, 1, 2, 3]
    assert method_for(ToMAConfig()).block_plans(["joint"] * 4) == [0, 0, 0, 0]  # SD3: every block, one plan


@pytest.mark.slow
def test_the_pass_plans_once_per_shared_group():
    from sdtm_compile.core.ops import sdtm_merge, sdtm_plan, sdtm_unmerge
    from sdtm_compile.core.schedule import EngineKey, Stage
    from sdtm_compile.models import TINY_FLUX_SCHNELL, flux_example_inputs, tiny_flux_transformer
    from sdtm_compile.passes import PassSettings, rewrite_for_engine
    from tests.helpers import capture_dynamo_graph

    model = tiny_flux_transformer(TINY_FLUX_SCHNELL, seed=0)  # 2 double + 2 single blocks
    gm, flat = capture_dynamo_graph(model, flux_example_inputs(TINY_FLUX_SCHNELL, 1, (24, 24)))
    for config, plans, merged_blocks in [(ToMAConfig(), 2, 3), (ToMAConfig(share_plan=False, unmerged_double=0), 4, 4)]:
        graph = rewrite_for_engine(gm, flat, PassSettings(config, EngineKey(Stage.MERGE, 0.5))).gm
        count = {op: sum(n.target is op for n in graph.graph.nodes) for op in (sdtm_plan, sdtm_merge, sdtm_unmerge)}
        # double blocks: the attention; single blocks: attention and MLP share one merge, two unmerges
        doubles = merged_blocks - 2
        assert count == {sdtm_plan: plans, sdtm_merge: merged_blocks, sdtm_unmerge: doubles + 2 * 2}, count
