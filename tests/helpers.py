"""Shared test helpers."""

from sdtm_compile.capture import capture_dynamo_graph

__all__ = ["capture_dynamo_graph"]
