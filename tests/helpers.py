"""Shared test helpers."""

from sdtm_compile.capture import capture_dynamo_graph

__all__ = ["capture_dynamo_graph", "transformer_call"]


def transformer_call(transformer):
    """Adapt a diffusers-signature transformer (compiled, ONNX, ...) to ``sampling.generate``'s call."""

    def call(hidden_states, encoder_hidden_states, pooled_projections, timestep):
        return transformer(
            hidden_states=hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections,
            timestep=timestep,
            return_dict=False,
        )[0]

    return call
