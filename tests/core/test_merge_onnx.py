"""Export-safety: plan + merge + unmerge through torch.onnx.export(dynamo=True) and ONNX Runtime."""

import pytest
import torch

from sdtm_compile.core.merge import merge, unmerge
from sdtm_compile.methods.sdtm.plans import idm_plan, ssm_plan

pytestmark = pytest.mark.onnx

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


class PlanMergeUnmerge(torch.nn.Module):
    def __init__(self, make_plan, grid, count):
        super().__init__()
        self.make_plan, self.grid, self.count = make_plan, grid, count
        self.options = {"a_s": 0.05} if make_plan is ssm_plan else {}

    def forward(self, x, li):
        plan, li_new = self.make_plan(x, li, *self.grid, self.count, **self.options)
        merged = merge(x, plan)
        # a stand-in for the attention/FF branch between merge and unmerge
        return merged, unmerge(torch.tanh(merged) * 2.0, plan), li_new, plan.slot


@pytest.mark.parametrize(
    "make_plan, grid, count",
    [(ssm_plan, (16, 16), 48), (idm_plan, (16, 16), 96), (ssm_plan, (12, 20), 32), (idm_plan, (9, 8), 32)],
    ids=["ssm", "idm", "ssm-nonsquare", "idm-odd"],
)
def test_onnx_runtime_matches_pytorch(tmp_path, make_plan, grid, count):
    torch.manual_seed(0)
    n = grid[0] * grid[1]
    module = PlanMergeUnmerge(make_plan, grid, count).eval()
    x = torch.randn(2, n, 32)
    li = torch.randint(0, 4, (2, n), dtype=torch.int32)
    path = tmp_path / "merge.onnx"
    torch.onnx.export(module, (x, li), str(path), dynamo=True, input_names=["x", "li"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # fresh inputs, not the ones traced with: the exported graph must not have baked any data-dependent value
    x2 = torch.randn(2, n, 32)
    li2 = torch.randint(0, 6, (2, n), dtype=torch.int32)
    got = session.run(None, {"x": x2.numpy(), "li": li2.numpy()})
    expected = module(x2, li2)
    for ours, theirs in zip(got, expected):
        assert ours.shape == tuple(theirs.shape)
        if theirs.dtype.is_floating_point:
            torch.testing.assert_close(torch.from_numpy(ours), theirs, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(torch.from_numpy(ours).to(theirs.dtype), theirs)
