"""A new method is one module: a config, a plan function and a TokenMethod, registered by being defined. Written
here in the test (as a user would in their own module) and run through the compiled backend, the eager reference,
the CLI's method list and the config registry, with no edit anywhere else."""

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from sdtm_compile import SDTMBackend, config_from_dict, method_names
from sdtm_compile.core.config import METHOD_CONFIGS, MethodConfig
from sdtm_compile.core.merge import MergePlan
from sdtm_compile.core.method import METHODS, TokenMethod, register_method
from sdtm_compile.core.plans import PLAN_METHODS, PlanSpec, plan_method
from sdtm_compile.core.schedule import EngineKey, Stage
from sdtm_compile.models import TINY_SD3, tiny_sd3_transformer
from sdtm_compile.models.sampling import generate, make_generation_inputs
from sdtm_compile.reference import ReferenceTransformer
from tests.helpers import transformer_call

pytestmark = pytest.mark.unit


@pytest.fixture
def stride_method():
    """``stride``: keep the first ``M`` tokens of the grid, each pruned token restored as a copy of a kept one
    (a toy rule: what matters is that it needs nothing but this fixture). Unregistered afterwards."""

    @dataclass(frozen=True)
    class StrideConfig(MethodConfig):
        method: ClassVar[str] = "stride"

    @plan_method("stride")
    def stride_plan(x, state, grid_h, grid_w, count):
        batch, n = x.shape[:2]
        kept = n - count
        slot = torch.arange(n, device=x.device) % kept
        members = torch.arange(kept, device=x.device)
        return MergePlan(slot.expand(batch, -1), x.new_ones(batch, kept), members.expand(batch, -1)[..., None]), state

    @register_method
    class StrideMethod(TokenMethod):
        config_class = StrideConfig

        def plan_spec(self, key: EngineKey, grid_h: int, grid_w: int) -> PlanSpec:
            return PlanSpec("stride", grid_h * grid_w - self.merged_tokens(key, grid_h, grid_w))

        def merged_branches(self, stage: Stage, family: str) -> tuple[str, ...]:
            return () if stage is Stage.FULL else ("attn", "attn2")

        def merged_tokens(self, key: EngineKey, grid_h: int, grid_w: int) -> int:
            n = grid_h * grid_w
            return n if key.stage is Stage.FULL else n - int(n * key.bucket)

    yield StrideConfig
    del METHOD_CONFIGS["stride"], METHODS[StrideConfig], PLAN_METHODS["stride"]


def test_a_method_defined_in_one_module_runs_everywhere(stride_method):
    config = config_from_dict({"method": "stride", "ratio": 0.5})
    assert isinstance(config, stride_method)
    assert "stride" in method_names()  # the CLI's --method choices and help come from here
    model = tiny_sd3_transformer(TINY_SD3, seed=4)
    inputs = make_generation_inputs(TINY_SD3, (32, 32), seed=1)
    torch._dynamo.reset()
    backend = SDTMBackend({"method": config, "engine": "eager", "history": 16})
    compiled = torch.compile(model, backend=backend, dynamic=False)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        got = generate(transformer_call(compiled), inputs, num_steps=4)
        want = generate(transformer_call(ReferenceTransformer(model, config)), inputs, num_steps=4)
        unmerged = generate(transformer_call(model), inputs, num_steps=4)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, unmerged, atol=1e-4)  # it merged
    assert {str(key) for key in backend.compiled[0].engines} == {"merge@0.5"}
