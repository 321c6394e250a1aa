"""The TensorRT-readiness lint: our bucket graphs pass; graphs with ops TensorRT cannot convert fail, named."""

import pytest
import torch

from sdtm_compile import SDTMConfig
from sdtm_compile.compiler.capture import capture_dynamo_graph
from sdtm_compile.core.schedule import FULL, Stage
from sdtm_compile.methods.sdtm.schedule import engines_for_trajectory
from sdtm_compile.models import TINY_SD3, example_inputs, tiny_sd3_transformer
from sdtm_compile.passes import (
    PassSettings,
    TensorRTLintError,
    lint_report,
    lint_tensorrt,
    rewrite_for_engine,
    to_aten,
)


@pytest.mark.slow
@pytest.mark.parametrize("latent", [64, 128], ids=["1024-tokens", "4096-tokens"])
def test_every_bucket_graph_passes(latent):
    model = tiny_sd3_transformer(TINY_SD3)
    gm, flat = capture_dynamo_graph(model, example_inputs(TINY_SD3, 2, (latent, latent)))
    n = (latent // 2) ** 2
    for key in [FULL, *engines_for_trajectory(SDTMConfig())]:
        rewritten = rewrite_for_engine(gm, flat, PassSettings(SDTMConfig(), key)).gm
        aten_graph = to_aten(rewritten, [*flat, torch.zeros(2, n, dtype=torch.int32)])
        findings = lint_tensorrt(aten_graph, key)  # raises on an error
        assert [f for f in findings if f.severity == "error"] == []
        ops = {str(n.target) for n in aten_graph.graph.nodes if n.op == "call_function"}
        if key != FULL:  # the merge ops are there, in the forms TensorRT converts
            assert "aten.gather.default" in ops
            # SSM merges by gather (fixed fan-in 4); only IDM needs an accumulating index_put
            assert ("aten.index_put.default" in ops) == (key.stage is Stage.DETAIL)
            assert ops & {"aten.scatter.src", "aten.scatter_.src"}
            assert not any("scatter_add" in op or "scatter_reduce" in op or "sort" in op for op in ops)


class Bad(torch.nn.Module):
    """What a naive token-merging implementation does: scatter_reduce(mean) and a large topk."""

    def __init__(self):
        super().__init__()
        self.score = torch.nn.Linear(8, 1)
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x):  # x: [B, N, 8] with N = 8192
        keep = self.score(x).squeeze(-1).topk(4096, dim=-1).indices
        kept = x.gather(1, keep[..., None].expand(-1, -1, 8))
        dst = torch.zeros_like(x[:, :16]).scatter_reduce(
            1, (keep[:, :64] % 16)[..., None].expand(-1, -1, 8), kept[:, :64], reduce="mean"
        )
        return self.proj(dst)


@pytest.mark.unit
def test_bad_graph_fails_with_the_nodes_named():
    module, x = Bad().eval(), torch.randn(2, 8192, 8)
    captured = {}

    def keep(gm, example_inputs):
        captured["gm"], captured["inputs"] = gm, list(example_inputs)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(module, backend=keep)(x)
    findings = lint_report(to_aten(captured["gm"], captured["inputs"]))
    by_op = {f.op: f for f in findings}
    assert by_op["aten.topk.default"].severity == "error"
    assert "k=4096 exceeds torch-tensorrt's limit of 3840" in by_op["aten.topk.default"].message
    assert by_op["aten.scatter_reduce.two"].severity == "error"
    assert all(f.node for f in findings)
    aten_graph = to_aten(captured["gm"], captured["inputs"])
    nodes_before = len(aten_graph.graph.nodes)
    with pytest.raises(TensorRTLintError) as info:
        lint_tensorrt(aten_graph)
    assert len(aten_graph.graph.nodes) == nodes_before  # a check: nothing changed
    assert "topk" in str(info.value)
    assert "scatter_reduce" in str(info.value)


@pytest.mark.unit
def test_findings_name_the_source_module():
    class Router(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.score = torch.nn.Linear(4, 1)

        def forward(self, x):
            return self.score(x).squeeze(-1).topk(5000, dim=-1).values

    class Scorer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.router = Router()

        def forward(self, x):
            return self.router(x) * 2

    captured = {}

    def keep(gm, example_inputs):
        captured["gm"], captured["inputs"] = gm, list(example_inputs)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(Scorer(), backend=keep)(torch.randn(1, 6000, 4))
    (finding,) = lint_report(to_aten(captured["gm"], captured["inputs"]))
    assert finding.op == "aten.topk.default"
    assert finding.module == "router"
    assert finding.node.startswith("topk")
    assert "in router" in str(finding)
