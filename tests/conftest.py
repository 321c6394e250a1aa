import fcntl
import json
import os
from pathlib import Path

import pytest
import torch

from sdtm_compile import SDTMConfig
from sdtm_compile.models import TINY_SD3, TINY_SD35, example_inputs, tiny_sd3_transformer

#: The shared SD3 bundle's config (tests/deploy/test_export.py, tests/deploy/triton/): the full graph, two detail
#: buckets and a structure bucket are what its schedule reaches (an ONNX export costs ~10 s per engine on 2 cores).
#: a block schedule (block 1 at half the ratio), so the export, ONNX parity and serving tests cover one
SHARED_BUNDLE_CONFIG = SDTMConfig(buckets=(0.3, 0.6), blocks=(1.0, 0.5))


# pytest-xdist already runs a test process per core: an engine build's own compiler processes would only contend
# with the other test process (measured: 143 s against 130 s for two Inductor test files). Builds run in the test's
# process unless a test asks for more (tests/compiler/test_exact_counts.py does, to cover the parallel build).
os.environ.setdefault("SDTM_BUILD_WORKERS", "1")
# Likewise Inductor's own pool of C++ compiler processes (two Inductor test files: 104.7 s with it, 100.3 s without)
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")


#: Test files that take a minute or more on one CI core (slowest durations of a CI run, 2026-12-06). They run
#: first: with ``--dist loadfile --no-loadscope-reorder`` (pyproject.toml) each xdist worker takes the next file in
#: this order as it frees; by default xdist orders files by their number of tests, which starts these few-but-slow
#: files late, where one of them can end the run alone. Measured: CI's pytest 737 s against 745 s, within the noise
#: between runs, so this is a safeguard rather than a proven speed-up.
HEAVY_FILES_FIRST = (
    "tests/parallel/test_context_parallel.py",
    "tests/cli/test_doctor.py",
    "tests/compiler/test_backend.py",
    "tests/compiler/test_half_precision.py",
    "tests/compiler/test_exact_counts.py",
    "tests/compiler/test_flux.py",
)


def pytest_collection_modifyitems(items):
    """The heavy files first (:data:`HEAVY_FILES_FIRST`); the rest, and each file's tests, keep their order."""
    rank = {path: number for number, path in enumerate(HEAVY_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))


#: The test lanes (pyproject.toml's markers). Every test carries exactly one: ``pytest -m unit`` is the quick lane,
#: ``pytest`` alone runs them all.
LANES = ("unit", "slow", "inductor", "onnx", "serving")


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    """A test file (or class) whose tests do not each carry exactly one lane marker (module, class, function and
    parameter marks together) fails to collect, naming them, whatever ``-m`` selects (under xdist too)."""
    report = yield
    if not report.passed:
        return report
    tests = [item for item in report.result if isinstance(item, pytest.Item)]
    problems = []
    for item in tests:
        lanes = [mark.name for mark in item.iter_markers() if mark.name in LANES]
        if len(lanes) != 1:
            problems.append(f"{item.nodeid}: {'lane markers ' + ', '.join(lanes) if lanes else 'no lane marker'}")
    if problems:
        report.outcome = "failed"
        report.longrepr = (
            f"every test needs exactly one lane marker of {LANES} (pyproject.toml; pytestmark = pytest.mark.<lane> "
            "for a whole file):\n  " + "\n  ".join(problems)
        )
        report.result = []
    return report


@pytest.fixture(scope="session", autouse=True)
def _engine_cache(tmp_path_factory):
    """One engine cache for the session, away from the user's ~/.cache (cold at the start of every run)."""
    import os

    os.environ["SDTM_CACHE_DIR"] = str(tmp_path_factory.mktemp("engine_cache"))
    yield


def _shared_bundle(tmp_path_factory, worker_id: str, name: str, config: SDTMConfig) -> tuple[Path, dict]:
    """The tiny SD3 model (seed 0) exported with ``config`` once per test session at batch 2, 32x32 latent, shared by
    the xdist workers (a file lock: the first worker to ask exports, the others wait and read it)."""
    from sdtm_compile.deploy.onnx import export_onnx

    # under xdist every worker's basetemp is a child of one per-session folder; alone, basetemp is that folder
    root = tmp_path_factory.getbasetemp() if worker_id == "master" else tmp_path_factory.getbasetemp().parent
    folder = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / "manifest.json").exists():
            model = tiny_sd3_transformer(TINY_SD3, seed=0)
            export_onnx(model, example_inputs(TINY_SD3, 2, (32, 32)), config, folder)
        return folder, json.loads((folder / "manifest.json").read_text())


@pytest.fixture(scope="session")
def shared_sd3_bundle(tmp_path_factory, worker_id) -> tuple[Path, dict]:
    """The tiny SD3 bundle of :data:`SHARED_BUNDLE_CONFIG`: ``(folder, manifest)``. Read-only: tests that damage a
    bundle copy it first."""
    return _shared_bundle(tmp_path_factory, worker_id, "shared_sd3_bundle", SHARED_BUNDLE_CONFIG)


@pytest.fixture(scope="session")
def shared_exact_bundle(tmp_path_factory, worker_id) -> tuple[Path, dict]:
    """The tiny SD3 bundle of ``SDTMConfig(counts="exact")`` (one graph per stage, count inputs): ``(folder,
    manifest)``, read-only; the export test checks it and the serving tests serve it."""
    return _shared_bundle(tmp_path_factory, worker_id, "shared_exact_bundle", SDTMConfig(counts="exact"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def sd3():
    return TINY_SD3, tiny_sd3_transformer(TINY_SD3, seed=0)


@pytest.fixture(scope="session")
def sd35():
    return TINY_SD35, tiny_sd3_transformer(TINY_SD35, seed=1)


@pytest.fixture(params=["sd3", "sd35"])
def tiny_model(request):
    return request.getfixturevalue(request.param)


__all__ = ["example_inputs"]
