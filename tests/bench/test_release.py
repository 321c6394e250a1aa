"""The release harness: a user's ``TR_SDTM.py`` loaded from its path, applied to our model, and undone.

The authors' file is never committed, so these tests use a stand-in written here that patches the way
``apply_SDTM`` does (the pipeline's and the transformer's classes swapped for subclasses, ``_tore_info`` set,
SD3.5's dual attention turned off); the harness must give the model back exactly as it was.
"""

import pytest
import torch

from sdtm_compile import SDTMConfig
from sdtm_compile.bench.release import ReleaseError, load_release, release_applied, release_switch_step
from sdtm_compile.models.sampling import diffusers_call, generate, make_generation_inputs

STAND_IN = """
import torch

CALLS = []


def apply_SDTM(pipe, ratio=0.5, deviation=0.2, switch_step=20, use_rand=True, a_s=0.05, mcw=0.2,
               protect_steps_frequency=None, **rest):
    CALLS.append(dict(ratio=ratio, deviation=deviation, switch_step=switch_step, a_s=a_s, mcw=mcw,
                      protect_steps_frequency=protect_steps_frequency))

    class Pipe(pipe.__class__):
        def __call__(self, *args, **kwargs):
            CALLS.append(("steps", kwargs["num_inference_steps"]))
            return super().__call__(*args, **kwargs)

    model = pipe.transformer

    class Model(model.__class__):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            return (out[0] * 0.5,)  # visibly not the unmodified model

    pipe.__class__ = Pipe
    model.__class__ = Model
    model._tore_info = {"args": {}}
    for module in model.modules():
        if type(module).__name__ == "JointTransformerBlock":
            module._tore_info = model._tore_info
            module.use_dual_attention = False
    return pipe
"""


@pytest.mark.unit
def test_the_release_switch_step_puts_the_switch_where_ours_is():
    assert release_switch_step(SDTMConfig(), 28) == 10  # 10 / 27 < 0.4 <= 11 / 27
    assert release_switch_step(SDTMConfig(), 50) == 19  # the release's default 20 of 50 runs one more SSM step
    assert release_switch_step(SDTMConfig(switch_at=0.0), 28) == -1


@pytest.mark.unit
def test_a_file_that_is_not_the_release_is_refused_saying_what_to_do(tmp_path):
    with pytest.raises(ReleaseError, match="no such file; fetch TR_SDTM.py"):
        load_release(tmp_path / "TR_SDTM.py")
    (tmp_path / "other.py").write_text("x = 1\n")
    with pytest.raises(ReleaseError, match="defines no apply_SDTM"):
        load_release(tmp_path / "other.py")
    (tmp_path / "needs.py").write_text("import a_module_nobody_installed\n")
    with pytest.raises(ReleaseError, match="pip install a_module_nobody_installed"):
        load_release(tmp_path / "needs.py")


@pytest.mark.slow
def test_the_release_runs_on_our_model_and_leaves_it_unmodified(sd3, sd35, tmp_path):
    path = tmp_path / "TR_SDTM.py"
    path.write_text(STAND_IN)
    release = load_release(path)
    spec, model = sd3
    inputs = make_generation_inputs(spec, (32, 32))
    config = SDTMConfig(counts="exact", cache_fusion=True)
    classes = [type(m) for m in model.modules()]
    with torch.no_grad():
        before = generate(diffusers_call(model), inputs, num_steps=6)
        with release_applied(release, model, lambda s: generate(diffusers_call(model), inputs, s), config, 6) as pipe:
            patched = pipe(num_inference_steps=6)
        after = generate(diffusers_call(model), inputs, num_steps=6)
    assert release.CALLS[0] == dict(
        ratio=0.5,
        deviation=0.2,
        switch_step=1,
        a_s=0.05,
        mcw=0.1,
        protect_steps_frequency=3,  # steps 0, 1 of 6
    )
    assert release.CALLS[1] == ("steps", 6)
    assert not torch.allclose(patched, before)  # the release's patch ran
    torch.testing.assert_close(after, before, rtol=0, atol=0)  # and is gone
    assert [type(m) for m in model.modules()] == classes
    assert not any("_tore_info" in m.__dict__ for m in model.modules())

    # SD3.5: apply_SDTM turns the dual attention off on every block; it comes back
    _, model = sd35
    duals = [m.use_dual_attention for m in model.modules() if "use_dual_attention" in m.__dict__]
    assert any(duals)
    with release_applied(release, model, lambda s: None, config, 6):
        assert not any(m.use_dual_attention for m in model.modules() if "use_dual_attention" in m.__dict__)
    assert [m.use_dual_attention for m in model.modules() if "use_dual_attention" in m.__dict__] == duals
