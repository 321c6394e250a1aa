"""What every pass receives besides the graph and its sites: the method, the engine being built, its contract."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property

from sdtm_compile.core.config import MethodConfig
from sdtm_compile.core.method import TokenMethod, method_for
from sdtm_compile.core.schedule import FULL, EngineKey
from sdtm_compile.core.signature import EngineSignature

__all__ = ["PassSettings"]


@dataclass(frozen=True)
class PassSettings:
    """Settings of one rewrite.

    Attributes:
        config: the method's configuration (any registered method's: :mod:`sdtm_compile.methods`).
        key: the (stage, bucket) this graph is rewritten for; ``FULL`` leaves the blocks unmerged.
        signature: the engine contract (:class:`~sdtm_compile.core.signature.EngineSignature`) the rewritten graph
            must keep; ``None``: the method's, built from the sites by :func:`rewrite_for_engine`.

    What is found in the graph (blocks, token grid, inputs) is not a setting: :func:`find_mmdit_blocks` returns
    it as a :class:`~sdtm_compile.passes.ModelSites`, which every pass takes and returns.
    """

    config: MethodConfig
    key: EngineKey = FULL
    signature: EngineSignature | None = field(default=None, compare=False)

    @cached_property
    def method(self) -> TokenMethod:
        """The :class:`~sdtm_compile.core.method.TokenMethod` of ``config``."""
        return method_for(self.config)

    @property
    def contract(self) -> EngineSignature:
        """``signature``, which :func:`rewrite_for_engine` fills in before any pass runs."""
        if self.signature is None:
            raise ValueError("PassSettings.signature is not set: run the pass through rewrite_for_engine")
        return self.signature

    def with_signature(self, signature: EngineSignature) -> PassSettings:
        return replace(self, signature=signature)
