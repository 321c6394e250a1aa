"""The public API and the old import paths: what users imported before the package was grouped into subpackages
still imports, warns once naming the new place, and is the same object as the new path's."""

import importlib
import importlib.metadata
import sys

import pytest

import sdtm_compile
from sdtm_compile._aliases import PREFIXES

pytestmark = pytest.mark.unit


def _import_old(name: str):
    """Import ``name`` afresh (as a first import would; an old parent package too), recording the warnings."""
    old_packages = {f"sdtm_compile.{old}" for old in PREFIXES}
    for old in [m for m in sys.modules if m == name or (m in old_packages and name.startswith(m + "."))]:
        sys.modules.pop(old)
    with pytest.warns(DeprecationWarning, match=r"^sdtm_compile\.\S+ moved to sdtm_compile\.") as records:
        module = importlib.import_module(name)
    assert any(str(r.message).startswith(f"{name} moved to") for r in records)
    return module


def test_the_public_api_is_where_it_was():
    for name in (
        "SDTMConfig",
        "ToMeSDConfig",
        "SiToConfig",
        "ToMAConfig",
        "FirstBlockCacheConfig",
        "generation",
        "compiled_graphs",
        "export_onnx",
        "OnnxTransformer",
        "BundleError",
        "StageDispatcher",
        "ConcurrentUseError",
        "EngineKey",
        "Stage",
        "MethodConfig",
        "TokenMethod",
        "method_for",
        "config_from_dict",
        "ssm_plan",
        "idm_plan",
        "merge",
        "unmerge",
    ):
        assert hasattr(sdtm_compile, name), name


def test_the_backends_resolve_by_entry_point():
    found = {e.name: e for e in importlib.metadata.entry_points(group="torch_dynamo_backends")}
    assert found["sdtm"].load() is sdtm_compile.compiler.backend.sdtm
    assert found["sdtm_trt"].load() is sdtm_compile.compiler.backend.sdtm_trt


def test_a_moved_module_is_the_new_one():
    from sdtm_compile.compiler import buckets
    from sdtm_compile.deploy.triton import load

    assert _import_old("sdtm_compile.buckets") is buckets
    assert _import_old("sdtm_compile.triton.load") is load  # an old package's submodule, not a second copy
    from sdtm_compile.models.testbed import model

    assert _import_old("sdtm_compile.testbed.model") is model


def test_a_split_module_finds_each_name_where_it_went():
    from sdtm_compile.core.schedule import EngineKey
    from sdtm_compile.deploy import OnnxTransformer, export_onnx
    from sdtm_compile.methods.sdtm.schedule import cra_ratio

    schedule = _import_old("sdtm_compile.schedule")
    assert schedule.EngineKey is EngineKey
    assert schedule.cra_ratio is cra_ratio
    export = _import_old("sdtm_compile.export")
    assert (export.export_onnx, export.OnnxTransformer) == (export_onnx, OnnxTransformer)
    config = _import_old("sdtm_compile.config")
    assert config.SDTMConfig is sdtm_compile.SDTMConfig
    with pytest.raises(AttributeError, match="moved to sdtm_compile.core.config"):
        config.no_such_name  # noqa: B018


def test_the_old_merge_module_leaves_the_merge_function_in_place():
    # ``merge`` was a module and the package's function of that name; importing the module must not rebind the name
    function = sdtm_compile.merge
    assert callable(function)
    old = importlib.import_module("sdtm_compile.merge")  # the old module path

    assert sdtm_compile.merge is function
    from sdtm_compile.core.plans import PlanSpec
    from sdtm_compile.methods.sdtm.plans import ssm_plan

    with pytest.warns(DeprecationWarning, match=r"^sdtm_compile\.merge moved to sdtm_compile\.core\.merge"):
        assert old.ssm_plan is ssm_plan  # the first lookup warns (no import-time warning: it was registered early)
    assert old.PlanSpec is PlanSpec
