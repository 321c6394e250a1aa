"""Token-reduction methods behind one interface (:class:`TokenMethod`): SDTM, ToMeSD, SiTo, ToMA.

Pick one through the backend options, ``options={"method": ToMeSDConfig(ratio=0.5)}``; the passes, the
dispatcher, export and the TensorRT lint are shared. See :mod:`sdtm_compile.methods.base` for the interface.
"""

from ..config import METHOD_CONFIGS, MethodConfig, SDTMConfig, config_from_dict
from .base import METHODS, TokenMethod, method_for, plan_method, register_method
from .sdtm import SDTMMethod
from .sito import SiToConfig, SiToMethod
from .toma import ToMAConfig, ToMAMethod
from .tomesd import ToMeSDConfig, ToMeSDMethod

__all__ = [
    "METHOD_CONFIGS",
    "METHODS",
    "MethodConfig",
    "SDTMConfig",
    "SDTMMethod",
    "SiToConfig",
    "SiToMethod",
    "ToMAConfig",
    "ToMAMethod",
    "ToMeSDConfig",
    "ToMeSDMethod",
    "TokenMethod",
    "config_from_dict",
    "method_for",
    "plan_method",
    "register_method",
]
