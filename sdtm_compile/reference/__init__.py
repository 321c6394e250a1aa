"""The eager reference: every method on SD3 / SD3.5 and Flux in plain PyTorch, the oracle of every compiled path.

* :mod:`.model`: :func:`reference_forward` (one forward on one engine) and :class:`ReferenceTransformer` (the
  same behind the dispatcher, called like the diffusers model);
* :mod:`.blocks`: one block per block class, one calling convention;
* :mod:`.attention`: the attention arithmetic of diffusers' processors, with per-row rotary positions and an
  additive key bias passed through the attention call (never by patching torch).
"""

from .attention import merged_rotary_emb
from .blocks import BlockCall, flux_double_block_forward, flux_single_block_forward, sd3_block_forward
from .model import (
    ReferenceTransformer,
    model_layout,
    reference_dispatcher,
    reference_engine,
    reference_forward,
    shard_layout,
    sharded_signature,
    token_grid,
)

#: The names the SD3-only and Flux-only references had (one class and one function now serve both families).
FluxReferenceTransformer = ReferenceTransformer
flux_reference_forward = reference_forward

__all__ = [
    "BlockCall",
    "FluxReferenceTransformer",
    "ReferenceTransformer",
    "flux_double_block_forward",
    "flux_reference_forward",
    "flux_single_block_forward",
    "merged_rotary_emb",
    "model_layout",
    "reference_dispatcher",
    "reference_engine",
    "reference_forward",
    "sd3_block_forward",
    "shard_layout",
    "sharded_signature",
    "token_grid",
]
