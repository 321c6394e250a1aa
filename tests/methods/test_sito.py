"""SiTo's plan against a brute-force reading of its rule: bases, pruned tokens, restoration, the noise."""

import pytest
import torch
import torch.nn.functional as F

from sdtm_compile import SiToConfig
from sdtm_compile.core.merge import merge, unmerge, window_token_index
from sdtm_compile.methods import method_for
from sdtm_compile.methods.sito import gaussian_noise, sito_plan, sito_tokens_pruned

pytestmark = pytest.mark.unit


def test_plan_follows_the_rule_brute_force():
    grid_h, grid_w = 8, 12
    n = grid_h * grid_w
    x = torch.randn(2, n, 16)
    state = method_for(SiToConfig(seed=1)).init_state(2, n)
    p = sito_tokens_pruned(0.5, grid_h, grid_w)
    assert p == 48
    plan, state_out = sito_plan(x, state, grid_h, grid_w, p, noise_alpha=0.1, sim_beta=1.0)
    noise, advanced = gaussian_noise(state)
    assert torch.equal(state_out, advanced)
    unit = F.normalize(x, dim=-1)
    similarity = unit @ unit.transpose(-1, -2)  # the N x N matrix SiTo builds; we sum in O(NC)
    score = similarity.sum(-1) + 0.1 * noise
    windows = window_token_index(grid_h, grid_w)
    for b in range(2):
        bases = windows[torch.arange(len(windows)), score[b, windows].argmax(-1)]
        kept = plan.members[b, :, 0]
        assert torch.equal(kept[-len(bases) :], bases)  # kept: unpruned candidates, then one base per window
        candidates = torch.tensor([t for t in range(n) if t not in set(bases.tolist())])
        best_to_base = similarity[b][candidates][:, bases].amax(-1)
        pruned = candidates[best_to_base.argsort(descending=True)[:p]]
        assert set(pruned.tolist()) == set(range(n)) - set(kept.tolist())
        assert len(set(kept.tolist())) == n - p  # every token kept once or pruned
        # a kept token is its own slot; a pruned one points to its most similar kept token
        assert torch.equal(plan.slot[b, kept], torch.arange(n - p))
        nearest = similarity[b][pruned][:, kept].argmax(-1)
        assert torch.equal(plan.slot[b, pruned], nearest)
    y = torch.randn(2, n - p, 16)
    restored = unmerge(y, plan)
    assert torch.equal(merge(x, plan), x.gather(1, plan.members.expand(-1, -1, 16)))  # a gather, no averaging
    assert torch.equal(restored.gather(1, plan.members.expand(-1, -1, 16)), y)


def test_noise_is_standard_normal_and_per_row():
    state = method_for(SiToConfig(seed=0)).init_state(4, 4096)
    noise, _ = gaussian_noise(state)
    assert abs(float(noise.mean())) < 0.03
    assert abs(float(noise.std()) - 1.0) < 0.03
    assert not torch.equal(noise[0], noise[1])  # SiTo draws noise per batch row
    assert torch.equal(state, method_for(SiToConfig(seed=0)).init_state(4, 4096))
