"""Shared test helpers."""

import torch

from sdtm_compile.compiler.backend import SDTMBackend
from sdtm_compile.compiler.capture import capture_dynamo_graph
from sdtm_compile.models.sampling import diffusers_call as transformer_call
from sdtm_compile.models.sampling import generate
from sdtm_compile.reference import reference_dispatcher

__all__ = ["capture_dynamo_graph", "transformer_call", "compiled_and_reference"]


def compiled_and_reference(model, inputs, config, steps, **options):
    """A generation through ``torch.compile(backend=SDTMBackend({"method": config, "engine": "eager", **options}))``
    under ``error_on_recompile=True``, checked against the eager reference's to 1e-5; returns ``(latent, backend)``."""
    backend = SDTMBackend({"method": config, "engine": "eager", **options})
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, dynamic=False)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        got = generate(transformer_call(compiled), inputs, num_steps=steps)
        want = generate(transformer_call(reference_dispatcher(model, config)), inputs, num_steps=steps)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    return got, backend
