"""``sdtm_compile.generation``: state owned per generation, safe to interleave and to use from threads."""

import threading

import pytest
import torch

import sdtm_compile
from sdtm_compile import EngineState, SDTMConfig
from sdtm_compile.compiler.backend import SDTMBackend
from sdtm_compile.models import TINY_SD3, tiny_sd3_transformer
from sdtm_compile.models.sampling import denoising, generate, make_generation_inputs
from sdtm_compile.runtime import StageDispatcher
from tests.helpers import transformer_call

STEPS = 8


@pytest.fixture(scope="module")
def compiled():
    """One tiny SD3 compiled with the sdtm backend (eager engine: the backend's own passes and dispatcher)."""
    model = tiny_sd3_transformer(TINY_SD3, seed=4)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=SDTMBackend({"engine": "eager"}), dynamic=False)
    with torch.no_grad():
        generate(transformer_call(compiled), make_generation_inputs(TINY_SD3, (32, 32), seed=0), num_steps=2)
    return compiled


def _in(context, call):
    """``call`` run inside ``context`` on every call (one ``with`` per transformer call)."""

    def run(*args):
        with context:
            return call(*args)

    return run


def _alone(compiled, inputs):
    with sdtm_compile.generation(compiled):
        return generate(transformer_call(compiled), inputs, num_steps=STEPS)


@pytest.mark.slow
def test_generations_interleaved_call_by_call_equal_each_run_alone(compiled):
    a, b = (make_generation_inputs(TINY_SD3, (32, 32), seed=s) for s in (1, 2))
    want_a, want_b = _alone(compiled, a), _alone(compiled, b)
    assert (want_a - want_b).abs().max() > 0.1  # two different generations
    context_a = sdtm_compile.generation(compiled, history=4 * STEPS)
    context_b = sdtm_compile.generation(compiled)
    steps_a = denoising(_in(context_a, transformer_call(compiled)), a, num_steps=STEPS)
    steps_b = denoising(_in(context_b, transformer_call(compiled)), b, num_steps=STEPS)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for (_, latent_a), (_, latent_b) in zip(steps_a, steps_b):  # A's call, then B's, step by step
            got_a, got_b = latent_a, latent_b
    torch.testing.assert_close(got_a, want_a, rtol=0, atol=0)
    torch.testing.assert_close(got_b, want_b, rtol=0, atol=0)
    history = context_a.history
    assert len(history) == STEPS
    assert history[0].new_generation
    assert not any(r.new_generation for r in history[1:])
    assert context_b.history == []  # history is off unless asked for


@pytest.mark.slow
def test_two_threads_each_in_their_own_context_equal_each_run_alone(compiled):
    a, b = (make_generation_inputs(TINY_SD3, (32, 32), seed=s) for s in (3, 4))
    want = [_alone(compiled, a), _alone(compiled, b)]
    got: list = [None, None]
    errors: list = []
    barrier = threading.Barrier(2, timeout=120)  # both threads finish step k before either starts step k + 1

    def worker(index, inputs):
        try:
            with sdtm_compile.generation(compiled):
                call = transformer_call(compiled)
                got[index] = generate(call, inputs, num_steps=STEPS, on_step=lambda step, t: barrier.wait())
        except Exception as err:  # reported below: an exception in a thread would otherwise vanish
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(i, x)) for i, x in enumerate((a, b))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)


@pytest.mark.unit
def test_one_context_cannot_be_open_twice_at_once():
    context = sdtm_compile.generation()
    with context, pytest.raises(sdtm_compile.ConcurrentUseError, match="already open"):
        with context:
            pass
    entered, release = threading.Event(), threading.Event()

    def hold():
        with context:
            entered.set()
            release.wait(30)

    thread = threading.Thread(target=hold)
    thread.start()
    entered.wait(30)
    try:
        with pytest.raises(sdtm_compile.ConcurrentUseError, match="another thread"):
            with context:
                pass
    finally:
        release.set()
        thread.join()
    with context:  # free again once the other thread left it
        pass


@pytest.mark.unit
def test_two_threads_on_the_default_state_are_refused_not_mixed():
    """Without contexts, a second caller while one is mid-call would share li: it gets an error instead."""
    dispatcher = StageDispatcher(SDTMConfig())
    inside, release = threading.Event(), threading.Event()

    def slow_engine(key, li):
        inside.set()
        release.wait(30)
        return "out", li

    call = (900.0, ("layout",), (1, 4), torch.device("cpu"), slow_engine)
    thread = threading.Thread(target=dispatcher.run, args=call)
    thread.start()
    inside.wait(30)
    try:
        with pytest.raises(sdtm_compile.ConcurrentUseError, match="without a generation context"):
            dispatcher.run(900.0, ("layout",), (1, 4), torch.device("cpu"), lambda key, li: ("out", li))
        with sdtm_compile.generation():  # a context has its own state: allowed beside the other caller
            assert dispatcher.run(900.0, ("layout",), (1, 4), torch.device("cpu"), lambda k, li: ("ok", li)) == "ok"
    finally:
        release.set()
        thread.join()


@pytest.mark.unit
def test_history_is_off_by_default_and_bounded():
    unbounded_calls = 10
    dispatcher = StageDispatcher(SDTMConfig())
    recording = StageDispatcher(SDTMConfig(), history=3)
    for step in range(unbounded_calls):
        for d in (dispatcher, recording):
            d.run(1000.0 - step, ("layout",), (1, 4), torch.device("cpu"), lambda key, li: (None, li))
    assert dispatcher.history == []
    assert [r.timestep for r in recording.history] == [993.0, 992.0, 991.0]
    with pytest.raises(ValueError, match="history must be a number of calls"):
        sdtm_compile.generation(history=-1)


@pytest.mark.unit
def test_a_record_holds_the_notes_its_extensions_wrote():
    def first_record(config):
        dispatcher = StageDispatcher(config, history=4)

        def call(key, state):  # an engine that returns SDTM*'s reading too (a plain method ignores it)
            return None, EngineState(state.li, stat=torch.tensor([0.25]))

        dispatcher.run(1000.0, ("layout",), (1, 4), torch.device("cpu"), call)
        return dispatcher.history[0]

    plain = first_record(SDTMConfig())
    assert dict(plain.notes) == {}
    with pytest.raises(AttributeError, match=r"no field or note 'statistic'; this call's notes: none"):
        plain.statistic  # noqa: B018
    adaptive = first_record(SDTMConfig(adaptive_threshold=0.5))
    assert dict(adaptive.notes) == {"adaptive_ratio": None, "statistic": 0.25}  # no ratio before the first reading
    assert adaptive.statistic == 0.25
    with pytest.raises(TypeError):
        adaptive.notes["statistic"] = 0.5  # a record is read-only


@pytest.mark.slow
def test_compiled_graphs_finds_each_models_own_graphs(compiled):
    other = tiny_sd3_transformer(TINY_SD3, seed=5)
    other_compiled = torch.compile(other, backend="sdtm", options={"engine": "eager"}, dynamic=False)
    assert sdtm_compile.compiled_graphs(other_compiled) == []  # torch.compile builds on the first call
    with torch.no_grad():
        generate(transformer_call(other_compiled), make_generation_inputs(TINY_SD3, (32, 32), seed=0), num_steps=1)
    (mine,) = sdtm_compile.compiled_graphs(compiled)
    (theirs,) = sdtm_compile.compiled_graphs(other_compiled)
    assert mine is not theirs
    assert sdtm_compile.compiled_graphs(other) == [theirs]  # the module itself works too
