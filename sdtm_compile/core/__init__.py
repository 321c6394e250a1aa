"""The method-agnostic core every other part builds on.

* :mod:`.config`: :class:`MethodConfig`, what every method's config shares, and the registry of configs by name;
* :mod:`.schedule`: engine keys, trajectory positions, ratio buckets, the timestep mapping;
* :mod:`.merge`: merge plans and the static-shape merge / unmerge primitives;
* :mod:`.plans`: the registry of plan functions;
* :mod:`.ops`: the operations the passes insert into a graph;
* :mod:`.layout`: the model as a method sees it (:class:`ModelLayout`);
* :mod:`.signature`: the engine contract (:class:`EngineSignature`, :class:`EngineState`);
* :mod:`.extension`: what a method may add to every engine (:class:`Extension`);
* :mod:`.method`: the method interface (:class:`TokenMethod`) and the registry of methods.
"""

from .config import DEFAULT_BUCKETS, METHOD_CONFIGS, MethodConfig, config_from_dict
from .extension import Extension, ExtensionRun, ReferenceHooks
from .layout import BlockLayout, ModelLayout
from .merge import MergePlan, merge, unmerge
from .method import METHODS, TokenMethod, engines_for_steps, method_for, register_method
from .plans import PLAN_METHODS, PlanSpec, plan_method
from .schedule import FULL, EngineKey, Stage, TokenCounts
from .signature import EngineSignature, EngineState, StateTensor

__all__ = [
    "DEFAULT_BUCKETS",
    "FULL",
    "METHODS",
    "METHOD_CONFIGS",
    "PLAN_METHODS",
    "BlockLayout",
    "EngineKey",
    "EngineSignature",
    "EngineState",
    "Extension",
    "ExtensionRun",
    "MergePlan",
    "MethodConfig",
    "ModelLayout",
    "PlanSpec",
    "ReferenceHooks",
    "Stage",
    "StateTensor",
    "TokenCounts",
    "TokenMethod",
    "config_from_dict",
    "merge",
    "method_for",
    "engines_for_steps",
    "plan_method",
    "register_method",
    "unmerge",
]
