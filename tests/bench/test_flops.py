"""FLOP counting: hand counts for a linear layer and CPU attention, and the analytic MMDiT block count."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from sdtm_compile.bench.flops import count_flops, mmdit_block_flops
from sdtm_compile.models import TINY_SD3, tiny_sd3_transformer

pytestmark = pytest.mark.unit


def test_linear_matches_a_hand_count():
    linear = torch.nn.Linear(16, 8)
    count, out = count_flops(linear, torch.randn(3, 5, 16))
    assert out.shape == (3, 5, 8)
    assert count.total == 2 * (3 * 5) * 16 * 8  # one multiply-add = 2 FLOPs
    assert count.by_op == {"addmm": count.total}


def test_cpu_attention_is_counted_with_torchs_sdpa_formula():
    b, h, nq, nk, d = 2, 3, 7, 11, 4
    q, k, v = torch.randn(b, h, nq, d), torch.randn(b, h, nk, d), torch.randn(b, h, nk, d)
    with FlopCounterMode(display=False) as plain:  # why count_flops exists: torch alone counts 0 on the CPU
        F.scaled_dot_product_attention(q, k, v)
    assert plain.get_total_flops() == 0
    count, _ = count_flops(F.scaled_dot_product_attention, q, k, v)
    assert count.total == 2 * (2 * b * h * nq * nk * d)  # Q K^T and A V
    assert count.by_op == {"_scaled_dot_product_flash_attention_for_cpu": count.total}


def test_block_formula_equals_the_counter_on_a_real_block():
    block = tiny_sd3_transformer(TINY_SD3).transformer_blocks[0]
    c, n, t = TINY_SD3.inner_dim, 256, TINY_SD3.text_tokens
    with torch.no_grad():
        count, _ = count_flops(block, torch.randn(2, n, c), torch.randn(2, t, c), torch.randn(2, c))
    parts = mmdit_block_flops(n, t, c, batch=2)
    assert count.total == sum(parts.values())
    assert count.by_op["_scaled_dot_product_flash_attention_for_cpu"] == parts["attention"]


def test_block_shares_depend_only_on_tokens_per_channel():
    # the benchmark model and SD3-medium at 1024^2 have the same (N + T) / C, so the same shares
    small, large = mmdit_block_flops(1024, 83, 384), mmdit_block_flops(4096, 333, 1536)
    for part in ("projections", "attention", "feed_forward"):
        assert abs(small[part] / sum(small.values()) - large[part] / sum(large.values())) < 2e-3


def test_op_times_split_a_call_the_way_the_flop_count_sees_it():
    from sdtm_compile.bench.instrument import op_times

    wide, gemv = torch.nn.Linear(32, 32), torch.nn.Linear(32, 64)
    x, cond = torch.randn(1, 64, 32), torch.randn(2, 32)
    q = torch.randn(1, 2, 64, 16)

    def call():
        h = torch.relu(wide(x)).sin()  # relu and sin: "other"
        return h, gemv(cond), F.scaled_dot_product_attention(q, q, q)

    times = op_times(call, calls=3)
    assert times.matmul_ms > 0 and times.gemv_ms > 0 and times.attention_ms > 0 and times.other_ms > 0
    assert times.total_ms == pytest.approx(sum(times.to_dict().values()))

    no_gemv = op_times(lambda: wide(x), calls=3)
    assert no_gemv.gemv_ms == 0 and no_gemv.attention_ms == 0 and no_gemv.matmul_ms > 0
