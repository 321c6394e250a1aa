"""ToMeSD's plan: equal to tomesd's own bipartite_soft_matching_random2d (the PyPI package, a test-only oracle)
on the same tokens, plan invariants, and the random destinations drawn from the engine's state input."""

import pytest
import torch

from sdtm_compile import ToMeSDConfig
from sdtm_compile.core.merge import merge, unmerge, window_token_index
from sdtm_compile.methods import method_for
from sdtm_compile.methods.base import advance_state, seeded_state
from sdtm_compile.methods.tomesd import tomesd_plan, tomesd_sources_merged

pytestmark = pytest.mark.unit

tomesd_merge = pytest.importorskip("tomesd.merge")


@pytest.mark.parametrize(
    "grid, sx, sy, ratio",
    [((16, 16), 2, 2, 0.5), ((12, 20), 2, 2, 0.3), ((9, 11), 2, 2, 0.6), ((12, 12), 3, 2, 0.4)],
    ids=["16x16", "12x20", "odd-9x11", "3x2-windows"],
)
def test_merge_and_unmerge_equal_tomesd(grid, sx, sy, ratio):
    """use_rand=False: the same destinations (top-left), sources ranked alike, the same merged tokens, and the same
    unmerged result (tomesd averages with scatter_reduce(mean), we gather and index_put). The unmerged sources come
    first in both, in rank order; the destinations follow in an order tomesd leaves to a non-stable argsort, so
    they are compared as a set (a permutation matching every row)."""
    grid_h, grid_w = grid
    n = grid_h * grid_w
    x = torch.randn(2, n, 24)
    r = tomesd_sources_merged(ratio, grid_h, grid_w, sy, sx)
    assert r == min(int(n * ratio), n - (grid_h // sy) * (grid_w // sx))  # tomesd's r = int(N * ratio), capped
    their_merge, their_unmerge = tomesd_merge.bipartite_soft_matching_random2d(
        x, grid_w, grid_h, sx, sy, r, no_rand=True
    )
    state = torch.zeros(2, n, dtype=torch.int32)
    plan, state_out = tomesd_plan(x, state, grid_h, grid_w, r, sx=sx, sy=sy, use_rand=False)
    ours = merge(x, plan)
    theirs = their_merge(x)
    assert ours.shape == theirs.shape == (2, n - r, 24)
    kept = n - (grid_h // sy) * (grid_w // sx) - r  # unmerged sources
    torch.testing.assert_close(ours[:, :kept], theirs[:, :kept], rtol=0, atol=0)
    distance = torch.cdist(theirs[:, kept:], ours[:, kept:], compute_mode="donot_use_mm_for_euclid_dist")
    match = distance.argmin(dim=-1)
    assert float(distance.amin(dim=-1).max()) < 1e-5
    assert all(torch.equal(row.sort().values, torch.arange(row.numel())) for row in match)  # a permutation
    y = torch.tanh(ours)  # a stand-in for the attention between merge and unmerge (tomesd's slot order)
    y_theirs = torch.cat([y[:, :kept], y[:, kept:].gather(1, match[..., None].expand(-1, -1, 24))], 1)
    torch.testing.assert_close(unmerge(y, plan), their_unmerge(y_theirs), rtol=0, atol=0)
    assert torch.equal(state_out, state)  # no randomness, no state change


def test_plan_invariants():
    grid_h, grid_w, r = 16, 16, 128
    x = torch.randn(2, grid_h * grid_w, 16)
    plan, _ = tomesd_plan(x, seeded_state(0, (2, 256)), grid_h, grid_w, r)
    m = 256 - r
    assert plan.slot.shape == (2, 256)
    assert int(plan.slot.min()) == 0
    assert int(plan.slot.max()) == m - 1
    for row in range(2):  # every token in exactly one slot; every slot holds its representative
        counts = torch.bincount(plan.slot[row], minlength=m)
        assert bool((counts >= 1).all())
        assert int(counts.sum()) == 256
        torch.testing.assert_close(plan.inv_count[row], 1.0 / counts.float())
        assert torch.equal(plan.slot[row, plan.members[row, :, 0]], torch.arange(m))
    assert plan.extra_tokens.shape == (2, r)
    ones = merge(torch.ones(2, 256, 3), plan)  # a mean of ones is one
    torch.testing.assert_close(ones, torch.ones_like(ones))


def test_random_destinations_come_from_the_state():
    """One destination per window at the position the state's high bits say; batch rows share it (as tomesd's
    rand_idx); the state advances once per block; the same seed gives the same plan."""
    grid_h, grid_w = 8, 8
    config = ToMeSDConfig(seed=3)
    state = method_for(config).init_state(2, 64)
    assert torch.equal(state, method_for(ToMeSDConfig(seed=3)).init_state(2, 64))
    assert not torch.equal(state, method_for(ToMeSDConfig(seed=4)).init_state(2, 64))
    assert torch.equal(state[0], state[1])
    x = torch.randn(2, 64, 8)
    plan, after = tomesd_plan(x, state, grid_h, grid_w, 16)
    assert torch.equal(after, advance_state(state))
    win = window_token_index(grid_h, grid_w)
    expected = win.gather(1, (state[0, win[:, 0]].long() * 4 // 65536)[:, None]).squeeze(1)
    destinations = plan.members[:, -win.shape[0] :, 0]  # the last G slots hold the destinations
    assert torch.equal(destinations[0], expected)
    assert torch.equal(destinations[1], expected)
    positions = [int(p) for p in (state[0, win[:, 0]].long() * 4 // 65536)]
    assert len(set(positions)) > 1  # random, not always the top-left
    second, _ = tomesd_plan(x, after, grid_h, grid_w, 16)
    assert not torch.equal(second.members, plan.members)  # the next block draws new destinations
