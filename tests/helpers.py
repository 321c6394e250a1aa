"""Shared test helpers."""

from sdtm_compile.compiler.capture import capture_dynamo_graph
from sdtm_compile.models.sampling import diffusers_call as transformer_call

__all__ = ["capture_dynamo_graph", "transformer_call"]
