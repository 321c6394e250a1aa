from functools import partial

import pytest
import torch
import torch.nn.functional as F

from sdtm_compile.core.merge import leftover_token_index, merge, unmerge, window_token_index
from sdtm_compile.core.schedule import EngineKey, Stage
from sdtm_compile.methods.sdtm.plans import idm_plan, init_li, ssm_plan
from sdtm_compile.methods.sdtm.schedule import idm_sources_merged, ssm_windows_merged, token_counts

pytestmark = pytest.mark.unit

GRIDS = [(8, 8), (16, 16), (32, 32), (12, 20), (9, 8), (7, 11)]
BUCKETS = [0.1, 0.3, 0.5, 0.7, 0.75]


def random_li(batch, n, high=5):
    return torch.randint(0, high, (batch, n), dtype=torch.int32)


def test_window_index_covers_grid_once():
    for grid_h, grid_w in GRIDS:
        tokens = torch.cat([window_token_index(grid_h, grid_w).reshape(-1), leftover_token_index(grid_h, grid_w)])
        assert sorted(tokens.tolist()) == list(range(grid_h * grid_w))
    assert window_token_index(4, 6)[1].tolist() == [2, 3, 8, 9]
    with pytest.raises(ValueError, match="no 2x2 window"):
        window_token_index(1, 8)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("bucket", BUCKETS)
@pytest.mark.parametrize("batch", [1, 2])
def test_static_output_shapes(grid, bucket, batch):
    n = grid[0] * grid[1]
    x, li = torch.randn(batch, n, 16), random_li(batch, n)
    for stage, make_plan, count, options in (
        (Stage.STRUCTURE, ssm_plan, ssm_windows_merged, {"a_s": 0.05}),
        (Stage.DETAIL, idm_plan, idm_sources_merged, {}),
    ):
        plan, li_new = make_plan(x, li, *grid, count(bucket, *grid), **options)
        merged_len = token_counts(EngineKey(stage, bucket), *grid).feed_forward
        assert plan.slot.shape == (batch, n)
        assert plan.slot.dtype == torch.int64
        assert plan.inv_count.shape == (batch, merged_len)
        y = merge(x, plan)
        assert y.shape == (batch, merged_len, 16)
        assert unmerge(y, plan).shape == x.shape
        assert li_new.shape == li.shape
        assert li_new.dtype == torch.int32
        # every merged slot receives at least one token, and the counts add up to N
        assert torch.equal((1 / plan.inv_count).round().sum(1), torch.full((batch,), float(n)))
        # the gather form (how merge runs) is the slot form (every token summed into its slot)
        fan_in = 4 if stage is Stage.STRUCTURE else 1
        assert plan.members.shape == (batch, merged_len, fan_in)
        slot_of_members = plan.slot.gather(1, plan.members.reshape(batch, -1)).reshape(plan.members.shape)
        assert torch.equal(slot_of_members, torch.arange(merged_len).expand(batch, fan_in, -1).transpose(1, 2))
        if plan.extra_tokens is not None:  # IDM: merged sources, each added once into its own slot
            removed = n - merged_len
            assert plan.extra_tokens.shape == plan.extra_slots.shape == (batch, removed)
            assert torch.equal(plan.slot.gather(1, plan.extra_tokens), plan.extra_slots)
            every_token = torch.cat([plan.members.reshape(batch, -1), plan.extra_tokens], 1).sort(1).values
            assert torch.equal(every_token, torch.arange(n).expand(batch, -1))
        slot_form = plan._replace(members=None, extra_tokens=None, extra_slots=None)
        torch.testing.assert_close(y, merge(x, slot_form), rtol=0, atol=1e-6)


@pytest.mark.parametrize("make_plan", [ssm_plan, idm_plan])
def test_ratio_zero_is_the_identity(make_plan):
    x, li = torch.randn(2, 256, 8), random_li(2, 256)
    plan, li_new = make_plan(x, li, 16, 16, 0, **({"a_s": 0.05} if make_plan is ssm_plan else {}))
    y = merge(x, plan)
    assert torch.equal(unmerge(y, plan), x)
    assert torch.equal(y.sort(dim=1).values, x.sort(dim=1).values)  # a permutation, nothing averaged
    if make_plan is ssm_plan:
        assert torch.equal(li_new, torch.zeros_like(li))  # nothing merged: every counter resets


def test_ssm_merges_window_means_and_unmerge_broadcasts():
    grid, k = (16, 16), 32
    x, li = torch.randn(2, 256, 8, dtype=torch.float64), random_li(2, 256)
    plan, li_new = ssm_plan(x, li, *grid, k, 0.05)
    y = merge(x, plan)
    back = unmerge(y, plan)
    windows = window_token_index(*grid)
    for b in range(2):
        merged_windows = 0
        for w in windows:
            slots = plan.slot[b, w]
            if slots.unique().numel() == 1:  # a merged window
                merged_windows += 1
                mean = x[b, w].mean(0)
                torch.testing.assert_close(y[b, slots[0]], mean)
                torch.testing.assert_close(back[b, w], mean.expand(4, -1))
                assert torch.equal(li_new[b, w], li[b, w] + 1)
            else:
                assert slots.unique().numel() == 4
                assert torch.equal(back[b, w], x[b, w])
                assert torch.equal(li_new[b, w], torch.zeros(4, dtype=torch.int32))
        assert merged_windows == k


def test_ssm_picks_the_most_uniform_windows():
    # 4x4 grid = 4 windows; windows 1 and 2 hold four copies of one token (similarity 1), the others noise
    x = torch.randn(1, 16, 32)
    windows = window_token_index(4, 4)
    for w in (1, 2):
        x[0, windows[w]] = torch.randn(32)
    plan, _ = ssm_plan(x, init_li(1, 16), 4, 4, 2, 0.0)
    merged = {w for w in range(4) if plan.slot[0, windows[w]].unique().numel() == 1}
    assert merged == {1, 2}


def test_li_hand_made_example_ssm():
    # li priority tips the balance between two equally uniform windows (docs/design.md, SSM: a_s * mean(li / mean(li)))
    x = torch.randn(8).expand(1, 16, 8)  # every token identical: all windows score exactly the same
    windows = window_token_index(4, 4)
    li = torch.zeros(1, 16, dtype=torch.int32)
    li[0, windows[3]] = torch.tensor([2, 2, 2, 2], dtype=torch.int32)
    plan, li_new = ssm_plan(x, li, 4, 4, 1, 0.05)
    assert plan.slot[0, windows[3]].unique().numel() == 1  # window 3 wins on li
    expected = torch.zeros(1, 16, dtype=torch.int32)
    expected[0, windows[3]] = 3  # merged: +1; everything unmerged: reset to 0
    assert torch.equal(li_new, expected)
    # with equal scores, the stable sort picks the first window
    plan, li_new = ssm_plan(x, torch.zeros_like(li), 4, 4, 1, 0.05)
    assert plan.slot[0, windows[0]].unique().numel() == 1


def test_li_hand_made_example_idm():
    # 2x4 grid: windows {0,1,4,5} and {2,3,6,7}; destinations = argmax li per window (ties -> first)
    li = torch.tensor([[0, 3, 1, 1, 0, 0, 1, 5]], dtype=torch.int32)
    x = torch.randn(1, 8, 4)
    x[0, 0] = x[0, 1] * 2.0  # token 0 points exactly like destination 1: similarity 1, the best source
    plan, li_new = idm_plan(x, li, 2, 4, 1)
    assert plan.slot[0, 0] == plan.slot[0, 1]  # token 0 merged into destination 1
    assert plan.slot[0].unique().numel() == 7
    # destinations 1 and 7 and merged source 0: +1; unmerged sources: 0
    assert li_new.tolist() == [[1, 4, 0, 0, 0, 0, 0, 6]]


def slow_idm(x, li, grid_h, grid_w, r):
    """IDM as the release's ``FIDM`` does it, with Python loops: returns (every token after merge+unmerge, li).

    Release lines followed (``TR_SDTM.py``): ``dst_pos = li_flat_win.argmax(dim=-1, keepdim=True)`` (one
    destination per window, the largest ``li``); ``node_max, node_idx = scores.max(dim=-1)`` and
    ``edge_idx = node_max.argsort(dim=-1, descending=True)`` (sources ranked by their best cosine similarity
    *alone*: ``a_d`` is never read); ``dst.scatter_reduce(..., src, reduce="mean")`` (a plain mean with the
    destination); ``last_ind.add_(1)`` then zeros at the unmerged sources.
    """
    n = grid_h * grid_w
    windows = [
        [(2 * gy + dy) * grid_w + 2 * gx + dx for dy in (0, 1) for dx in (0, 1)]
        for gy in range(grid_h // 2)
        for gx in range(grid_w // 2)
    ]
    covered = {t for w in windows for t in w}
    dsts, srcs = [], []
    for w in windows:
        values = [int(li[t]) for t in w]
        d = w[values.index(max(values))]
        dsts.append(d)
        srcs += [t for t in w if t != d]
    srcs += [t for t in range(n) if t not in covered]
    unit = F.normalize(x, dim=-1)
    scored = []
    for i, s in enumerate(srcs):
        sims = [float(unit[s] @ unit[d]) for d in dsts]
        best = max(range(len(dsts)), key=lambda j: (sims[j], -j))
        scored.append((sims[best], i, s, dsts[best]))
    ranked = sorted(scored, key=lambda item: (-item[0], item[1]))
    groups = {d: [d] for d in dsts}
    for _, _, s, d in ranked[:r]:
        groups[d].append(s)
    out = x.clone()
    new_li = [0] * n
    for members in groups.values():
        mean = sum(x[m] for m in members) / len(members)
        for m in members:
            out[m] = mean
            new_li[m] = int(li[m]) + 1
    return out, new_li


@pytest.mark.parametrize("grid, r", [((4, 4), 5), ((6, 4), 16), ((8, 8), 32), ((5, 7), 11), ((4, 6), 0)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_idm_matches_slow_loop(grid, r, seed):
    torch.manual_seed(seed)
    n = grid[0] * grid[1]
    x = torch.randn(2, n, 6, dtype=torch.float64)
    li = random_li(2, n, high=4)
    plan, li_new = idm_plan(x, li, *grid, r)
    back = unmerge(merge(x, plan), plan)
    for b in range(2):
        expected, expected_li = slow_idm(x[b], li[b], *grid, r)
        torch.testing.assert_close(back[b], expected, rtol=1e-12, atol=1e-12)
        assert li_new[b].tolist() == expected_li


def test_idm_ranks_sources_by_similarity_alone():
    """A long-unmerged source is not promoted (the release reads no ``a_d``): the most similar source wins."""
    # 2x4 grid: windows {0,1,4,5} and {2,3,6,7}; li makes 1 and 7 the destinations. Source 2 has li 4, four
    # times the sources' mean; a 0.05 * li / mean(li) bonus would lift it (0.9 + 0.3) above source 0 (0.99).
    li = torch.tensor([[0, 3, 4, 0, 0, 0, 0, 5]], dtype=torch.int32)
    x = torch.randn(1, 8, 64)
    unit = F.normalize(x[0], dim=-1)
    x[0, 0] = 0.99 * unit[1] + (1 - 0.99**2) ** 0.5 * F.normalize(unit[3] - (unit[3] @ unit[1]) * unit[1], dim=0)
    x[0, 2] = 0.90 * unit[7] + (1 - 0.90**2) ** 0.5 * F.normalize(unit[6] - (unit[6] @ unit[7]) * unit[7], dim=0)
    similarity = F.normalize(x[0], dim=-1) @ F.normalize(x[0, [1, 7]], dim=-1).T
    assert similarity[0].max() == pytest.approx(0.99, abs=1e-4)
    assert similarity[2].max() == pytest.approx(0.9, abs=1e-4)
    assert similarity[[3, 4, 5, 6]].max() < 0.9  # the other sources are far less similar
    plan, _ = idm_plan(x, li, 2, 4, 1)
    assert plan.slot[0, 0] == plan.slot[0, 1]  # source 0 is merged into destination 1
    assert plan.slot[0].unique().numel() == 7
    assert plan.slot[0, 2] != plan.slot[0, 7]


def test_batch_rows_pick_different_tokens_same_count():
    x = torch.randn(2, 256, 8)
    for make_plan, k in ((partial(ssm_plan, a_s=0.05), 32), (idm_plan, 96)):
        plan, _ = make_plan(x, init_li(2, 256), 16, 16, k)
        assert not torch.equal(plan.slot[0], plan.slot[1])
        assert plan.inv_count.shape[1] == merge(x, plan).shape[1]


def test_same_inputs_same_plan():
    x, li = torch.randn(2, 256, 8), random_li(2, 256)
    for make_plan, k in ((partial(ssm_plan, a_s=0.05), 32), (idm_plan, 96)):
        first, second = make_plan(x, li, 16, 16, k), make_plan(x.clone(), li.clone(), 16, 16, k)
        assert torch.equal(first[0].slot, second[0].slot)
        assert torch.equal(first[1], second[1])


def test_half_precision_inputs():
    x = torch.randn(2, 256, 8).to(torch.bfloat16)
    plan, _ = idm_plan(x, init_li(2, 256), 16, 16, 64)
    y = merge(x, plan)
    assert y.dtype == torch.bfloat16
    assert unmerge(y, plan).dtype == torch.bfloat16


def test_bad_shapes_have_clear_errors():
    with pytest.raises(ValueError, match="do not fill the 8x8 token grid"):
        ssm_plan(torch.randn(1, 60, 4), init_li(1, 60), 8, 8, 1, 0.05)
    with pytest.raises(ValueError, match=r"expected image tokens \[B, N, C\]"):
        idm_plan(torch.randn(64, 4), init_li(1, 64), 8, 8, 1)
    with pytest.raises(ValueError, match="li must be"):
        idm_plan(torch.randn(1, 64, 4), init_li(2, 64), 8, 8, 1)
    with pytest.raises(ValueError, match="cannot merge 17 of 16 windows"):
        ssm_plan(torch.randn(1, 64, 4), init_li(1, 64), 8, 8, 17, 0.05)
    with pytest.raises(ValueError, match="cannot merge 49 of 48 sources"):
        idm_plan(torch.randn(1, 64, 4), init_li(1, 64), 8, 8, 49)


@pytest.mark.parametrize(
    ("make_plan", "options", "counts"),
    [
        # counts SDTM's schedule reaches on this grid (multiples of 16). All 64 windows (ratio 0.75) leaves no
        # window unmerged: a size-0 part, which Dynamo specialises, so that count needs a graph of its own.
        (ssm_plan, {"a_s": 0.05}, [16, 32, 48]),
        (idm_plan, {}, [16, 64, 96, 176]),
    ],
)
def test_sdtm_plans_keep_a_symbolic_count_one_graph_serves_every_count(make_plan, options, counts):
    """The merged count as a dynamic dimension (the exact schedule's way to avoid one engine per count): traced
    once with the count read from an input's size, the plan serves every count with no recompile, exactly as
    eager. A count passed through ``int()`` would have been specialised to the first value."""
    from torch._dynamo.testing import CompileCounterWithBackend

    grid_h, grid_w = 16, 16
    x = torch.randn(2, grid_h * grid_w, 8)
    li = random_li(2, grid_h * grid_w)

    def merged(x, li, carrier):
        plan, new_li = make_plan(x, li, grid_h, grid_w, carrier.shape[0], **options)
        y = merge(x, plan)
        return y.sum(dim=1), unmerge(y, plan), new_li

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(merged, backend=counter, dynamic=False)
    first = torch.empty(counts[0])
    torch._dynamo.maybe_mark_dynamic(first, 0)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for count in counts:
            carrier = first if count == counts[0] else torch.empty(count)
            got, want = compiled(x, li, carrier), merged(x, li, torch.empty(count))
            torch.testing.assert_close(got[:2], want[:2], rtol=1e-5, atol=1e-5)
            assert torch.equal(got[2], want[2])
    assert counter.frame_count == 1
    torch._dynamo.reset()
