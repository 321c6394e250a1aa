"""Token-reduction methods behind one interface (:class:`~sdtm_compile.core.method.TokenMethod`): SDTM, ToMeSD,
SiTo, ToMA.

Pick one through the backend options, ``options={"method": ToMeSDConfig(ratio=0.5)}``; the passes, the
dispatcher, export and the TensorRT lint are shared. Every module and subpackage of this package is imported
here, so a method registers its config, its plan functions and its class just by being in the package: adding a
method is one module (and its tests).
"""

import importlib
import pkgutil

from ..core.config import METHOD_CONFIGS, config_from_dict
from ..core.method import METHODS, TokenMethod, method_for, register_method

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from .sdtm import SDTMConfig, SDTMMethod  # noqa: E402  (the built-in methods, by name)
from .sito import SiToConfig, SiToMethod  # noqa: E402
from .toma import ToMAConfig, ToMAMethod  # noqa: E402
from .tomesd import ToMeSDConfig, ToMeSDMethod  # noqa: E402

__all__ = [
    "METHOD_CONFIGS",
    "METHODS",
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
    "method_names",
    "register_method",
]


def method_names() -> tuple[str, ...]:
    """Every registered method's name (the CLI's ``--method`` choices, the bench's ``--methods``)."""
    return tuple(METHOD_CONFIGS)
