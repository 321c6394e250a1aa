"""SDTM (structure-then-detail token merging, CVPR 2025) as one method among the others.

* :mod:`.config`: :class:`SDTMConfig`, every field validated;
* :mod:`.schedule`: the CRA ratio, the structure / detail stages, the release's token counts;
* :mod:`.plans`: SSM and IDM, and the ``li`` counter;
* :mod:`.method`: :class:`SDTMMethod`, the method interface's answers;
* its extensions (:mod:`sdtm_compile.core.extension`), each one module: :mod:`.cache_fusion` (the release's step
  cache), :mod:`.adaptive` (SDTM*) and :mod:`.size_aware` (size-aware attention, ours).
"""

from .adaptive import AdaptiveRatio
from .cache_fusion import CacheFusion, CacheFusionError, cache_slots, fuse_cached
from .config import MAX_RATIO, SDTMConfig
from .method import MERGED_BRANCHES, SDTMMethod
from .plans import idm_plan, init_li, ssm_plan, update_li, window_score_fraction
from .schedule import (
    cra_ratio,
    engine_key_at,
    engines_for_trajectory,
    idm_sources_merged,
    ssm_windows_merged,
    stage_at,
    token_counts,
)
from .size_aware import SizeAwareAttention, key_size_bias

__all__ = [
    "MAX_RATIO",
    "MERGED_BRANCHES",
    "AdaptiveRatio",
    "CacheFusion",
    "CacheFusionError",
    "SDTMConfig",
    "SDTMMethod",
    "SizeAwareAttention",
    "cache_slots",
    "cra_ratio",
    "engine_key_at",
    "engines_for_trajectory",
    "fuse_cached",
    "idm_plan",
    "idm_sources_merged",
    "init_li",
    "key_size_bias",
    "ssm_plan",
    "ssm_windows_merged",
    "stage_at",
    "token_counts",
    "update_li",
    "window_score_fraction",
]
