"""The on-disk engine cache: a second compile loads; a corrupt entry is reported once and rebuilt."""

import json
import warnings

import pytest
import torch

from sdtm_compile import SDTMConfig
from sdtm_compile.compiler.backend import SDTMBackend
from sdtm_compile.engines.cache import EngineCache
from sdtm_compile.models import TinySpec, example_inputs, tiny_sd3_transformer

# A small model and two buckets keep the Inductor builds of this file to a few seconds.
SPEC = TinySpec(num_layers=1)
CONFIG = SDTMConfig(ratio=0.3, deviation=0.0, buckets=(0.3,))


@pytest.mark.unit
def test_store_load_and_corruption(tmp_path):
    cache = EngineCache(tmp_path)
    cache.store("k1", lambda path: open(path, "wb").write(b"engine bytes"), {"engine": "test"})
    assert cache.load("k1", lambda path: open(path, "rb").read()) == b"engine bytes"
    assert cache.load("missing", lambda path: 1 / 0) is None
    (tmp_path / "k1.bin").write_bytes(b"engine by")  # truncated
    with pytest.warns(RuntimeWarning, match=r"k1.bin is unusable \(ValueError: sha256 .* does not match"):
        assert cache.load("k1", lambda path: open(path, "rb").read()) is None
    assert not (tmp_path / "k1.bin").exists()
    assert not (tmp_path / "k1.json").exists()
    cache.store("k2", lambda path: open(path, "wb").write(b"x"), {})
    (tmp_path / "k2.json").write_text("{")
    with pytest.warns(RuntimeWarning, match="k2.bin is unusable"):
        assert cache.load("k2", lambda path: b"") is None
    cache.store("k3", lambda path: open(path, "wb").write(b"x"), {})
    with pytest.warns(RuntimeWarning, match="k3.bin is unusable.*boom"):
        assert cache.load("k3", lambda path: (_ for _ in ()).throw(RuntimeError("boom"))) is None


def compile_once(cache_dir, caplog):
    model = tiny_sd3_transformer(SPEC)
    torch._dynamo.reset()
    backend = SDTMBackend({"sdtm": CONFIG, "engine": "inductor", "cache_dir": str(cache_dir)})
    caplog.clear()
    with torch.no_grad(), caplog.at_level("INFO", logger="sdtm_compile"):
        out = torch.compile(model, backend=backend, dynamic=False)(
            **example_inputs(SPEC, 2, (16, 16), timestep=1000.0), return_dict=False
        )[0]
    return out, caplog.text.count("loaded engine")


@pytest.mark.inductor
def test_second_compile_loads_and_corrupt_entries_are_rebuilt(tmp_path, caplog):
    first, loaded = compile_once(tmp_path, caplog)
    entries = sorted(tmp_path.glob("*.bin"))
    # one entry per distinct region of structure@0.3 and detail@0.3 (one block): the glue before and after the
    # block (shared), the block's prefix and merged part in each stage
    assert loaded == 0
    assert len(entries) == 6
    assert all(json.loads(p.with_suffix(".json").read_text())["engine"] == "inductor" for p in entries)

    second, loaded = compile_once(tmp_path, caplog)
    assert loaded == 6
    torch.testing.assert_close(second, first, rtol=0, atol=0)

    entries[0].write_bytes(entries[0].read_bytes()[: len(entries[0].read_bytes()) // 2])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        third, loaded = compile_once(tmp_path, caplog)
    reports = [w for w in caught if "is unusable" in str(w.message)]
    assert len(reports) == 1
    assert entries[0].name in str(reports[0].message)
    assert loaded == 5  # the other entries still load; the corrupt one was rebuilt and stored again
    assert entries[0].exists()
    torch.testing.assert_close(third, first, rtol=0, atol=0)


@pytest.mark.unit
def test_cache_can_be_turned_off(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SDTM_CACHE_DIR", "off")
    from sdtm_compile.compiler.backend import BackendSettings

    assert BackendSettings().resolved_cache_dir() is None
    assert BackendSettings(cache_dir=False).resolved_cache_dir() is None
    assert BackendSettings(cache_dir=str(tmp_path)).resolved_cache_dir() == tmp_path


@pytest.mark.unit
def test_key_follows_the_graph_and_the_compiler_settings_not_the_schedule(tmp_path):
    from sdtm_compile.compiler.capture import capture_dynamo_graph
    from sdtm_compile.core.schedule import EngineKey, Stage
    from sdtm_compile.passes import PassSettings, rewrite_for_engine

    model = tiny_sd3_transformer(SPEC)
    gm, flat = capture_dynamo_graph(model, example_inputs(SPEC, 2, (16, 16)))
    inputs = [*flat, torch.zeros(2, 64, dtype=torch.int32)]
    cache = EngineCache(tmp_path)

    def key(config, bucket=0.3, stage=Stage.DETAIL):
        rewritten = rewrite_for_engine(gm, flat, PassSettings(config, EngineKey(stage, bucket))).gm
        return cache.key(rewritten, inputs, "inductor")

    base = key(SDTMConfig(ratio=0.3, deviation=0.0, buckets=(0.3,)))
    assert key(SDTMConfig(ratio=0.5, deviation=0.2)) == base  # same bucket graph under another schedule
    with torch.no_grad():  # an inference build is another engine than a grad-mode one (weights require grad)
        assert key(SDTMConfig(ratio=0.3, deviation=0.0, buckets=(0.3,))) != base
    structure = key(SDTMConfig(), stage=Stage.STRUCTURE)
    assert key(SDTMConfig(a_s=0.1), stage=Stage.STRUCTURE) != structure  # a constant inside the graph
    assert key(SDTMConfig(), bucket=0.5) != base
    assert key(SDTMConfig(), stage=Stage.STRUCTURE) != base
    with torch._inductor.config.patch({"cpp.enable_kernel_profile": True}):
        assert key(SDTMConfig()) != base  # the compiler's own settings
