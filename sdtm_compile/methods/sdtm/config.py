"""SDTM's config: :class:`SDTMConfig`, validated when built, with the release's names where they differ."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from ...core.config import NAMED_CONFIGS, MethodConfig

__all__ = ["SDTMConfig", "MAX_RATIO"]

#: Neither stage can remove more than 3 of every 4 tokens: SSM keeps one token per 2x2 window and IDM keeps
#: every window's destination.
MAX_RATIO = 0.75

#: Names a user of the authors' release may pass, with why they are not fields here.
_RELEASE_NAMES = {
    "a_d": "a_d is declared by the release's apply_SDTM but never read (its FIDM ranks sources by similarity "
    "alone): drop it.",
    "switch_step": "Use switch_at, a fraction of the trajectory (the release's switch_step=20 of 50 is 0.4).",
    "protect_steps_frequency": "Use cache_fusion=True with protect_every (the release's sample script: 3).",
    "protect_layers_frequency": "Use blocks='protect-every:K' (the release's protect_layers_frequency=K).",
}


@dataclass(frozen=True)
class SDTMConfig(MethodConfig):
    """Structure-then-detail token merging (SDTM), as released by its authors, plus what compiling it needs.

    Every field is checked at construction time; a bad value raises ``ValueError`` that names the field, the
    value and the allowed range. ``ratio``, ``buckets`` and the timestep fields are :class:`MethodConfig`'s.

    Attributes:
        ratio: Centre of the compression-ratio schedule: the fraction of image tokens removed, on average, in
            the merged attention/FF. ``0`` turns SDTM off (the model runs unmodified). Range ``[0, 0.75]``.
        deviation: Half-width of the CRA (compression ratio adjusting) cosine schedule: the ratio falls from
            ``ratio + deviation`` at the first step to ``ratio - deviation`` at the last. Range
            ``[0, ratio]`` with ``ratio + deviation <= 0.75``.
        switch_at: Where the structure stage ends and the detail stage begins, as a fraction of the trajectory
            (the release switches after step 20 of 50, i.e. 0.4). Range ``[0, 1]``: 0 = detail only,
            1 = structure only.
        window: Merge window on the token grid ``(height, width)``. Only ``(2, 2)`` is implemented, as in the
            release.
        a_s: Weight of the "not attended" counter ``li`` in the SSM window score. Range ``[0, 10]``.
            (There is no ``a_d``: the release's ``apply_SDTM`` accepts one and stores it, but no line of it is
            ever read; its detail stage ranks sources by their best similarity alone, and so does ours.)
        merge_attention: Whether the structure stage merges the attention too. ``None`` (default): the model
            family's choice - SD3 / SD3.5 yes (as released), Flux no (the authors left attention unmerged on
            RoPE models). ``True`` on Flux merges every block's attention (double and single-stream),
            each merged token taking its representative token's rotary position; ``False`` on SD3 merges only
            the feed-forward.
        cache_fusion: The release's step cache. Every ``protect_every``-th step of a generation (0, k, 2k, ...)
            runs the unmerged engine and stores each merged branch's gated output; the other steps blend their
            merged positions with it, ``mcw * computed + (1 - mcw) * cached`` (:mod:`.cache_fusion`). Default off,
            as ``apply_SDTM``; the release's evaluation scripts turn it on. SD3 / SD3.5 only.
        protect_every: With ``cache_fusion``: how often a step is protected (the release's
            ``protect_steps_frequency``; its sample script uses 3). Range ``[1, 1000]``.
        mcw: With ``cache_fusion``: the weight of the freshly computed output in the blend (the release's ``mcw``;
            its sample script uses 0.1, ``apply_SDTM``'s default is 0.2). Range ``[0, 1]``.
        adaptive_threshold: SDTM* (the paper's adaptive variant, dead code in the release): ``None`` (default) keeps
            the CRA schedule; a number makes every engine report the fraction of the first block's 2x2 windows
            whose SSM score reaches it, and the next step runs at ``0.75 x`` that fraction, rounded down to a bucket
            (:mod:`.adaptive`). Range ``[-1, 2]``.
        size_aware_attention: Prompt reweighting, our formulation (the release declares ``a_p`` and never reads
            it): in a merged attention each merged image key gets an additive ``log(size)`` bias, so it keeps the
            attention mass of the tokens it stands for (:mod:`.size_aware`). Default off.
        text_key_weight: With ``size_aware_attention``: the text keys' bias is ``log(text_key_weight)`` (1: none).
            Range ``(0, 100]``.
        counts: How a step's ratio becomes token counts. ``"buckets"`` (default): rounded down to a bucket of
            ``buckets``, one static-shape engine per (stage, bucket). ``"exact"``: the release's count at the step's
            own ratio (``int(N * ratio)``, then ``// 48 * 16`` windows in the structure stage, ``// 16 * 16``
            sources in the detail stage), one engine per stage whose plans take their count as an input (a dynamic
            dimension: Inductor with a symbolic size, ONNX with a dynamic axis, TensorRT with a shape range);
            ``buckets`` is then unused. Not with ``adaptive_threshold`` (SDTM* picks a bucket per step).
    """

    method: ClassVar[str] = "sdtm"
    max_ratio: ClassVar[float] = MAX_RATIO
    field_hints: ClassVar[dict[str, str]] = _RELEASE_NAMES
    _other_fields: ClassVar[tuple[str, ...]] = (
        "window",
        "merge_attention",
        "cache_fusion",
        "adaptive_threshold",
        "size_aware_attention",
        "counts",
    )

    deviation: float = 0.2
    switch_at: float = 0.4
    window: tuple[int, int] = (2, 2)
    a_s: float = 0.05
    merge_attention: bool | None = None
    cache_fusion: bool = False
    protect_every: int = 3
    mcw: float = 0.1
    adaptive_threshold: float | None = None
    size_aware_attention: bool = False
    text_key_weight: float = 1.0
    counts: str = "buckets"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.deviation <= self.ratio or self.ratio + self.deviation > MAX_RATIO + 1e-9:
            self._fail(
                "deviation",
                self.deviation,
                f"0 <= deviation <= ratio ({self.ratio}) and ratio + deviation <= {MAX_RATIO}",
            )
        if not 0.0 <= self.switch_at <= 1.0:
            self._fail("switch_at", self.switch_at, "0 <= switch_at <= 1 (a fraction of the trajectory)")
        if tuple(self.window) != (2, 2):
            self._fail("window", self.window, "(2, 2) only: the SSM/IDM windows of the release")
        object.__setattr__(self, "window", (2, 2))
        if not 0.0 <= self.a_s <= 10.0:
            self._fail("a_s", self.a_s, "0 <= value <= 10")
        if not (self.merge_attention is None or isinstance(self.merge_attention, bool)):
            self._fail("merge_attention", self.merge_attention, "None (the model family's choice), True or False")
        self._check_flag("cache_fusion")
        self._check_flag("size_aware_attention")
        if isinstance(self.protect_every, bool) or not isinstance(self.protect_every, int):
            self._fail("protect_every", self.protect_every, "an int from 1 to 1000 (steps)")
        if not 1 <= self.protect_every <= 1000:
            self._fail("protect_every", self.protect_every, "an int from 1 to 1000 (steps)")
        if not 0.0 <= self.mcw <= 1.0:
            self._fail("mcw", self.mcw, "0 <= mcw <= 1")
        threshold = self.adaptive_threshold
        if threshold is not None and (
            isinstance(threshold, bool)
            or not isinstance(threshold, (int, float))
            or not math.isfinite(threshold)
            or not -1.0 <= threshold <= 2.0
        ):
            self._fail("adaptive_threshold", threshold, "None (the fixed CRA schedule) or a number in [-1, 2]")
        if not 0.0 < self.text_key_weight <= 100.0:
            self._fail("text_key_weight", self.text_key_weight, "0 < text_key_weight <= 100")
        if self.counts not in ("buckets", "exact"):
            allowed = "'buckets' (static engines per ratio bucket) or 'exact' (one engine per stage)"
            self._fail("counts", self.counts, allowed)
        if self.counts == "exact" and threshold is not None:
            self._fail("counts", self.counts, "'buckets' with adaptive_threshold (SDTM* picks a bucket per step)")

    @classmethod
    def release_eval(cls, **overrides: object) -> SDTMConfig:
        """The operating point of the authors' evaluation scripts, ``sample.py`` and ``sample_ddp.py`` (the scripts
        behind the paper's FID), as their argparse defaults set it::

            parser.add_argument("--num_inference_steps", type=int, default=50)
            parser.add_argument("--SDTM-ratio", type=float, default=0.3)
            parser.add_argument("--SDTM-deviation", type=float, default=0.2)
            parser.add_argument("--SDTM-switch-step", type=int, default=20)
            parser.add_argument("--SDTM-a-s", type=float, default=0.05)
            parser.add_argument("--SDTM-mcw", type=float, default=0.1, help="the weight for merge is w, ...")
            parser.add_argument("--SDTM-protect-steps-frequency", type=int, default=3, help='Frequency for ...')
            parser.add_argument("--SDTM-protect-layers-frequency", type=int, default=-1, help='Frequency for ...')

        That is ratio 0.3 +- 0.2, the switch after step 20 of 50 (``switch_at=0.4``), cache fusion on every 3rd
        step with ``mcw`` 0.1, and every block merged (a negative layer frequency is "disabled" in the release's
        ``compute_ratio``). Both scripts pass exactly these to ``apply_SDTM``; their ``--SDTM-cache_each_step``
        flag is never passed on (``apply_SDTM`` stores ``"cache_each_step": False``). ``apply_SDTM``'s own
        defaults (``ratio: float = 0.5``, ``protect_steps_frequency: int = None``) are :class:`SDTMConfig`'s
        defaults without cache fusion. ``overrides``: any other field (e.g. ``buckets``)."""
        values: dict[str, object] = dict(
            ratio=0.3, deviation=0.2, switch_at=0.4, a_s=0.05, cache_fusion=True, protect_every=3, mcw=0.1
        )
        return cls(**{**values, **overrides})  # type: ignore[arg-type]

    @property
    def adaptive(self) -> bool:
        """SDTM*: the ratio of each step comes from the previous step's window statistic."""
        return self.enabled and self.adaptive_threshold is not None

    @property
    def exact_counts(self) -> bool:
        """Each step merges the schedule's exact count (``counts="exact"``), not a bucket's."""
        return self.enabled and self.counts == "exact"

    @property
    def fuses_cache(self) -> bool:
        """Cache fusion is on (and SDTM is)."""
        return self.enabled and self.cache_fusion


NAMED_CONFIGS["sdtm-release-eval"] = SDTMConfig.release_eval
