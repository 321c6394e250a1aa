"""``sdtm-compile doctor``: what this machine has, and (``--gpu``) the GPU check, one table.

``sdtm-compile doctor`` prints the environment: torch, CUDA, and whether torch-tensorrt is installed at the version
that matches torch (torch 2.13 needs torch-tensorrt 2.13.x).

``sdtm-compile doctor --gpu`` is the check a user with one CUDA GPU runs (``scripts/gpu_check.sh`` wraps it):

1. the environment report; ``--install`` installs torch-tensorrt matching torch when it is missing or mismatched
   (without the flag the pip command is only printed); ``--tests`` runs ``pytest -q tests -k tensorrt``;
2. the model of ``--model`` (``sd3-medium`` by default) at ``--latent`` (128: 1024x1024 images) in ``--dtype``
   (float16), random weights, on the GPU;
3. one row per variant - ``eager`` (the reference), ``inductor`` (plain ``torch.compile``: the baseline of every
   speed-up), ``tensorrt`` (torch-tensorrt alone), ``sdtm`` and ``sdtm_trt`` - each timed the same way: the first
   call (the compile / engine build and one transformer call), then the median of ``--runs`` whole generations
   (``--steps`` steps, the SD3 pipeline's CFG loop or FLUX.1's, after one warm-up generation), the peak GPU memory
   and the largest absolute difference of the final latent to the eager reference's.

``--dry-run`` runs the same check on the CPU with a tiny model (``tiny-sd3``, latent 16, 2 steps, float32): every
variant that can run there runs for real; the TensorRT variants become "skipped: <reason>" rows. Progress goes to
the log (stderr); the report and the table are the command's output (stdout), and ``--json PATH`` saves them.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.metadata
import json
import logging
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "BASELINE",
    "CheckReport",
    "CheckSettings",
    "DRY_RUN_DEFAULTS",
    "Environment",
    "GPU_DEFAULTS",
    "GpuUnavailableError",
    "InstallResult",
    "Row",
    "TestsResult",
    "VARIANTS",
    "format_table",
    "install_torch_tensorrt",
    "register",
    "run_check",
    "run_tensorrt_tests",
    "settings_from_args",
]

logger = logging.getLogger(__name__)

#: The variants of the check, in table order. ``eager`` comes first: it is the reference of every difference.
VARIANTS = ("eager", "inductor", "tensorrt", "sdtm", "sdtm_trt")
#: The variant every speed-up is taken against: the model under plain ``torch.compile`` (Inductor).
BASELINE = "inductor"
#: Variants that need torch-tensorrt and CUDA (skipped, with the reason, elsewhere).
TENSORRT_VARIANTS = frozenset({"tensorrt", "sdtm_trt"})
#: What each variant is, for the report.
VARIANT_DESCRIPTIONS = {
    "eager": "the model op by op (the reference of every difference)",
    "inductor": "torch.compile(model) with Inductor (the speed-up baseline)",
    "tensorrt": 'torch.compile(model, backend="torch_tensorrt"): torch-tensorrt alone',
    "sdtm": 'torch.compile(model, backend="sdtm"): SDTM token merging, Inductor engines',
    "sdtm_trt": 'torch.compile(model, backend="sdtm_trt"): SDTM token merging, TensorRT engines',
}
#: torch-tensorrt's options for the ``tensorrt`` variant: every op it can convert in TensorRT (the ``sdtm_trt``
#: engines use ``min_block_size=1`` too), and a failed engine build raises instead of quietly running PyTorch.
TENSORRT_OPTIONS: dict[str, Any] = {"min_block_size": 1, "pass_through_build_failures": True}
#: The GPU check's defaults (``steps=None``: the preset's, 28 for ``sd3-medium``).
GPU_DEFAULTS: dict[str, Any] = {"model": "sd3-medium", "latent": 128, "steps": None, "dtype": "float16"}
#: ``--dry-run``'s defaults: a tiny model a 2-core CPU compiles and runs in seconds.
DRY_RUN_DEFAULTS: dict[str, Any] = {"model": "tiny-sd3", "latent": 16, "steps": 2, "dtype": "float32"}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
#: The warnings of the ``sdtm_trt`` backend that mean an engine was built with Inductor instead of TensorRT.
_FALLBACK_WARNINGS = ("falling back to inductor", "building inductor engines instead")


class GpuUnavailableError(RuntimeError):
    """The GPU check was asked for on a machine where torch sees no CUDA device."""


# --------------------------------------------------------------------------------------------------------------------
# the environment


def _major_minor(version: str) -> str | None:
    """``"2.13.0+cu130"`` -> ``"2.13"`` (``None`` if ``version`` does not start with two numbers)."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return f"{match.group(1)}.{match.group(2)}" if match else None


def _distribution_version(*names: str) -> str | None:
    """The installed version of the first of ``names`` that is installed (pip metadata; nothing is imported)."""
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


@dataclass(frozen=True)
class Environment:
    """What the check needs to know about this machine (read without importing torch-tensorrt)."""

    python: str
    platform: str
    torch: str
    cuda_available: bool
    torch_cuda: str | None  #: the CUDA version torch was built with (``None``: a CPU build)
    device_name: str | None
    torch_tensorrt: str | None  #: the installed torch-tensorrt version (``None``: not installed)
    tensorrt: str | None  #: the installed TensorRT Python package's version

    @classmethod
    def detect(cls) -> Environment:
        """Read the environment of this process."""
        cuda = torch.cuda.is_available()
        return cls(
            python=platform.python_version(),
            platform=platform.platform(),
            torch=torch.__version__,
            cuda_available=cuda,
            torch_cuda=torch.version.cuda,
            device_name=torch.cuda.get_device_name(0) if cuda else None,
            torch_tensorrt=_distribution_version("torch-tensorrt", "torch_tensorrt"),
            tensorrt=_distribution_version("tensorrt", "tensorrt-cu13", "tensorrt-cu12"),
        )

    @property
    def torch_tensorrt_wanted(self) -> str:
        """The torch-tensorrt release series that matches torch: torch 2.13 -> ``"2.13"``."""
        return _major_minor(self.torch) or self.torch

    @property
    def torch_tensorrt_matches(self) -> bool:
        """Whether torch-tensorrt is installed at torch's major.minor version."""
        return self.torch_tensorrt is not None and _major_minor(self.torch_tensorrt) == self.torch_tensorrt_wanted

    def install_command(self) -> list[str] | None:
        """The pip command that installs the matching torch-tensorrt, or ``None`` when it is already installed."""
        if self.torch_tensorrt_matches:
            return None
        return [sys.executable, "-m", "pip", "install", f"torch-tensorrt=={self.torch_tensorrt_wanted}.*"]

    def tensorrt_unavailable(self, dry_run: bool) -> str | None:
        """Why the TensorRT variants cannot run here (every reason, ``; ``-joined), or ``None`` if they can."""
        reasons = []
        if dry_run:
            reasons.append("dry run on the CPU (TensorRT engines need CUDA inputs)")
        if not self.cuda_available:
            build = "a CPU build of torch" if self.torch_cuda is None else "no CUDA device visible"
            reasons.append(f"CUDA is not available ({build})")
        if self.torch_tensorrt is None:
            reasons.append(
                f"torch-tensorrt is not installed (pip install 'torch-tensorrt=={self.torch_tensorrt_wanted}.*')"
            )
        elif not self.torch_tensorrt_matches:
            reasons.append(
                f"torch-tensorrt {self.torch_tensorrt} does not match torch {self.torch} "
                f"(needs {self.torch_tensorrt_wanted}.x)"
            )
        return "; ".join(reasons) or None

    def lines(self) -> list[str]:
        """The environment report, a line per fact."""
        device = self.device_name if self.cuda_available else "none (torch.cuda.is_available() is False)"
        if self.torch_tensorrt is None:
            trt = f"not installed (torch {self.torch} needs torch-tensorrt {self.torch_tensorrt_wanted}.x)"
        else:
            verdict = "matches" if self.torch_tensorrt_matches else "DOES NOT match"
            trt = f"{self.torch_tensorrt} ({verdict} torch {self.torch_tensorrt_wanted})"
        lines = [
            f"python          {self.python} ({self.platform})",
            f"torch           {self.torch} (CUDA build: {self.torch_cuda or 'none, a CPU build'})",
            f"CUDA device     {device}",
            f"torch-tensorrt  {trt}",
            f"tensorrt        {self.tensorrt or 'not installed'}",
        ]
        cuda_major = (self.torch_cuda or "").split(".")[0]
        if cuda_major and cuda_major != "13":
            # torch-tensorrt 2.13's wheels on PyPI depend on tensorrt-cu13 (read from the wheel's metadata)
            lines.append(
                f"note            torch is built for CUDA {self.torch_cuda}; torch-tensorrt 2.13 from PyPI is built "
                "for CUDA 13 (PyTorch's own index, download.pytorch.org/whl/cu<version>, has builds for others)"
            )
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self),
            "torch_tensorrt_wanted": self.torch_tensorrt_wanted,
            "torch_tensorrt_matches": self.torch_tensorrt_matches,
        }


# --------------------------------------------------------------------------------------------------------------------
# installing torch-tensorrt and running the TensorRT tests


@dataclass(frozen=True)
class InstallResult:
    """What ``--install`` did: the pip command (``None``: nothing to install), whether it ran, and why (not)."""

    command: list[str] | None
    ran: bool
    returncode: int | None
    message: str

    @property
    def ok(self) -> bool:
        return not self.ran or self.returncode == 0

    def lines(self) -> list[str]:
        if self.command is None:
            return [self.message]
        return [f"command         {shlex.join(self.command)}", self.message]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def install_torch_tensorrt(env: Environment, run: bool, dry_run: bool) -> InstallResult:
    """Install torch-tensorrt matching torch with pip when it is missing or mismatched - only when ``run`` is set,
    not in a dry run, and only where CUDA is available (torch-tensorrt needs a CUDA build of torch and a GPU)."""
    command = env.install_command()
    if command is None:
        return InstallResult(
            None, False, None, f"torch-tensorrt {env.torch_tensorrt} matches torch: nothing to install"
        )
    if not run:
        return InstallResult(command, False, None, "not run (pass --install to run it)")
    if dry_run:
        return InstallResult(command, False, None, "not run: a dry run installs nothing")
    if not env.cuda_available:
        return InstallResult(
            command, False, None, "not run: CUDA is not available, and torch-tensorrt needs CUDA torch and a GPU"
        )
    logger.info("installing torch-tensorrt: %s", shlex.join(command))
    returncode = subprocess.run(command, check=False).returncode
    verdict = "installed" if returncode == 0 else f"FAILED (pip exit status {returncode})"
    return InstallResult(command, True, returncode, f"ran: {verdict}")


def source_root() -> Path | None:
    """The source checkout this package runs from (an editable install), or ``None`` (no ``tests/`` there)."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "tests").is_dir() and (root / "pyproject.toml").is_file() else None


@dataclass(frozen=True)
class TestsResult:
    """What ``--tests`` ran and how it ended (``returncode`` ``None``: not run, ``summary`` says why)."""

    __test__ = False  # not a pytest test class

    command: list[str]
    returncode: int | None
    summary: str
    seconds: float | None = None

    @property
    def status(self) -> str:
        if self.returncode is None:
            return "not run"
        if self.returncode == 5:
            return "no tests ran"
        return "passed" if self.returncode == 0 else "FAILED"

    @property
    def ok(self) -> bool:
        return self.returncode in (None, 0)

    def lines(self) -> list[str]:
        took = "" if self.seconds is None else f" in {self.seconds:.0f} s"
        return [f"command         {shlex.join(self.command)}", f"result          {self.status}{took}: {self.summary}"]

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "status": self.status}


def run_tensorrt_tests(
    root: Path | None = None, paths: Sequence[str] = ("tests",), keyword: str = "tensorrt"
) -> TestsResult:
    """``python -m pytest -q <paths> -k <keyword>`` in ``root`` (the source checkout), in a subprocess."""
    command = [sys.executable, "-m", "pytest", "-q", *paths, "-k", keyword]
    root = root if root is not None else source_root()
    if root is None:
        return TestsResult(command, None, "the tests ship with the source checkout, not with the installed package")
    logger.info("running the TensorRT tests: %s (in %s) ...", shlex.join(command), root)
    start = time.perf_counter()
    result = subprocess.run(command, cwd=root, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    output = (result.stdout + result.stderr).splitlines()
    for line in output:
        logger.debug("pytest: %s", line)
    if result.returncode not in (0, 5):  # a failure: show the end of pytest's report
        for line in output[-40:]:
            logger.error("pytest: %s", line)
    summaries = [
        line.strip("= ") for line in output if re.search(r"\b(passed|failed|skipped|error|no tests ran)", line)
    ]
    summary = summaries[-1] if summaries else (output[-1] if output else "no output")
    return TestsResult(command, result.returncode, summary, seconds)


# --------------------------------------------------------------------------------------------------------------------
# the check


@dataclass(frozen=True)
class CheckSettings:
    """What the check runs: the model and generation, the variants, and where (``dry_run``: CPU)."""

    model: str
    latent: int
    steps: int
    dtype: torch.dtype
    layers: int | None = None
    runs: int = 3
    dry_run: bool = False
    variants: tuple[str, ...] = VARIANTS
    cold_caches: bool = False

    @property
    def device(self) -> torch.device:
        return torch.device("cpu" if self.dry_run else "cuda")

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["dtype"] = str(self.dtype).removeprefix("torch.")
        values["variants"] = list(self.variants)
        values["device"] = str(self.device)
        return values


@dataclass
class Row:
    """One variant's measurements (``None``: not measured). ``status`` is ``ok``, ``fallback`` (measured, but
    some TensorRT engine builds fell back to Inductor: ``note`` says how many), ``skipped: <reason>`` or
    ``failed: <error>``; ``peak_memory_mib`` is ``None`` on the CPU (shown as n/a)."""

    variant: str
    description: str
    status: str = "ok"
    first_call_s: float | None = None
    seconds: list[float] = field(default_factory=list)
    s_per_generation: float | None = None
    speedup: float | None = None
    peak_memory_mib: float | None = None
    max_abs_diff: float | None = None
    note: str = ""

    @property
    def measured(self) -> bool:
        return self.status in ("ok", "fallback")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class CheckReport:
    """Everything the command reports: environment, install, tests, settings and the table's rows."""

    environment: Environment
    install: InstallResult
    tests: TestsResult | None
    settings: CheckSettings | None
    rows: list[Row]
    description: str = ""
    seconds: float | None = None

    @property
    def ok(self) -> bool:
        """Nothing failed: no failed row, no TensorRT build fell back, pip and the tests (where run) succeeded."""
        failed = any(row.status.startswith("failed") or row.status == "fallback" for row in self.rows)
        return not failed and self.install.ok and (self.tests is None or self.tests.ok)

    def text(self) -> str:
        """The report as the command prints it."""
        out = ["environment", *(f"  {line}" for line in self.environment.lines())]
        out += ["torch-tensorrt install", *(f"  {line}" for line in self.install.lines())]
        if self.tests is not None:
            out += ["TensorRT tests", *(f"  {line}" for line in self.tests.lines())]
        if self.settings is not None:
            out += ["", self.description, "", format_table(self.rows), ""]
            out += [f"  {row.variant:<9} {VARIANT_DESCRIPTIONS[row.variant]}" for row in self.rows]
            device = "the CPU" if self.settings.dry_run else "the GPU"
            caches = (
                "fresh (cold)" if self.settings.cold_caches else "the usual ones (warm where earlier runs filled them)"
            )
            out += [
                "",
                f"speed-up = s/generation of {BASELINE} (plain torch.compile) / the variant's; first call = compile "
                "or engine build + one transformer call; max |diff| = largest absolute difference of the final "
                "latent to the eager reference generation's",
                f"caches: {caches}; everything above ran on {device}"
                + (f" in {self.seconds:.0f} s" if self.seconds else ""),
            ]
            if self.settings.dry_run:
                out.append("DRY RUN: no GPU part of the check ran; the TensorRT rows are skipped, not measured.")
        return "\n".join(out)

    def to_dict(self) -> dict[str, Any]:
        return {
            "environment": self.environment.to_dict(),
            "install": self.install.to_dict(),
            "tests": None if self.tests is None else self.tests.to_dict(),
            "settings": None if self.settings is None else self.settings.to_dict(),
            "description": self.description,
            "baseline": f"{BASELINE} (plain torch.compile)",
            "gpu_parts_ran": self.settings is not None and not self.settings.dry_run,
            "seconds": self.seconds,
            "rows": [row.to_dict() for row in self.rows],
            "table": format_table(self.rows),
        }


COLUMNS = (
    ("variant", "<"),
    ("first call (s)", ">"),
    ("s/generation", ">"),
    (f"speed-up vs {BASELINE}", ">"),
    ("peak GPU memory", ">"),
    ("max |diff| vs eager", ">"),
    ("status", "<"),
)


def _cells(row: Row) -> list[str]:
    def number(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    if not row.measured:
        return [row.variant, "-", "-", "-", "-", "-", row.status]
    memory = "n/a" if row.peak_memory_mib is None else f"{row.peak_memory_mib / 1024:.2f} GiB"
    status = row.status + (f" ({row.note})" if row.note else "")
    speedup = "-" if row.speedup is None else f"{row.speedup:.2f}x"
    return [
        row.variant,
        number(row.first_call_s, ".2f"),
        number(row.s_per_generation, ".4g"),
        speedup,
        memory,
        number(row.max_abs_diff, ".3g"),
        status,
    ]


def format_table(rows: Sequence[Row]) -> str:
    """The rows as a plain-text table (the command's result; ``--json`` saves it as ``table``)."""
    cells = [[name for name, _ in COLUMNS], *(_cells(row) for row in rows)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS) - 1)]
    lines = []
    for line in cells:
        parts = [format(cell, f"{align}{width}") for cell, (_, align), width in zip(line, COLUMNS, widths)]
        lines.append("  ".join([*parts, line[-1]]).rstrip())
    lines.insert(1, "  ".join("-" * width for width in [*widths, len(COLUMNS[-1][0])]))
    return "\n".join(lines)


class _OnDevice:
    """Calls ``module`` with every tensor argument moved to ``device``.

    The sampling loops make the timestep (and Flux's guidance) on the CPU, where the scheduler keeps its
    timesteps; the diffusers pipelines put them on the model's device. The first call goes through this too,
    so it lays out its inputs exactly as the generations do (compiled code guards on strides).
    """

    def __init__(self, module: Callable[..., Any], device: torch.device) -> None:
        self.module = module
        self.device = device

    def _to(self, value: Any) -> Any:
        return value.to(self.device) if isinstance(value, torch.Tensor) else value

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*map(self._to, args), **{key: self._to(value) for key, value in kwargs.items()})


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release(device: torch.device) -> None:
    """Forget the previous variant's compiled code and memory; reset the peak GPU memory counter."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _workload(settings: CheckSettings):
    """The model on the check's device and one generation's inputs, as the benchmark's
    :class:`~sdtm_compile.bench.workload.Workload`, with its :class:`~sdtm_compile.bench.config.BenchConfig`."""
    from ..bench.config import BenchConfig
    from ..bench.workload import make_workload

    config = BenchConfig(
        model=settings.model,
        latent=settings.latent,
        layers=settings.layers,
        dtype=str(settings.dtype).removeprefix("torch."),
        steps=settings.steps,
        runs=settings.runs,
        warmup=1,
        sweep=(),
    )
    start = time.perf_counter()
    workload = make_workload(config, settings.device)
    workload.model.eval()
    logger.info(
        "built %s (%d blocks, %s) on %s in %.1f s",
        settings.model,
        workload.spec.num_blocks,
        settings.dtype,
        settings.device,
        time.perf_counter() - start,
    )
    return workload, config


def _compile(variant: str, model: torch.nn.Module, method: Any, cache_dir: Path | None) -> Callable[..., Any]:
    """The variant's module: the model itself (``eager``) or a ``torch.compile`` of it (built on its first call)."""
    if variant == "eager":
        return model
    if variant == "inductor":
        return torch.compile(model, dynamic=False)
    if variant == "tensorrt":
        import torch_tensorrt  # noqa: F401  (registers the torch_tensorrt backend with Dynamo)

        return torch.compile(model, backend="torch_tensorrt", dynamic=False, options=dict(TENSORRT_OPTIONS))
    options = {"method": method, "cache_dir": cache_dir}
    return torch.compile(model, backend=variant, dynamic=False, options=options)


def _engine_note(variant: str, module: Any, before: set[int], caught: list[warnings.WarningMessage]) -> tuple[str, int]:
    """Which engines an ``sdtm`` / ``sdtm_trt`` compile built, and how many TensorRT builds fell back to Inductor
    (the backend warns for each; with regional engines the engine names are the planned ones)."""
    if variant not in ("sdtm", "sdtm_trt"):
        return "", 0
    from ..compiler import compiled_graphs

    graphs = [graph for graph in compiled_graphs(module) if id(graph) not in before]
    names = Counter(name for graph in graphs for name in graph.engine_names.values())
    parts = [", ".join(f"{count} {name} engines" for name, count in sorted(names.items()))]
    fallbacks = sum(any(text in str(w.message).lower() for text in _FALLBACK_WARNINGS) for w in caught)
    if fallbacks:
        parts.append(f"{fallbacks} TensorRT build(s) FELL BACK to Inductor (see the log)")
    return "; ".join(part for part in parts if part), fallbacks


def _measure(
    variant: str, workload: Any, config: Any, settings: CheckSettings, cache_dir: Path | None
) -> tuple[Row, torch.Tensor, torch.Tensor]:
    """Compile ``variant``, time its first call and its generations; returns its row and the final latents of its
    warm-up generation and of its last timed one."""
    from ..compiler import compiled_graphs

    device = settings.device
    row = Row(variant, VARIANT_DESCRIPTIONS[variant])
    _release(device)
    before = {id(graph) for graph in compiled_graphs(workload.model)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = _compile(variant, workload.model, config.method, cache_dir)
        logger.info("%s: first call (compile / build + one transformer call) ...", variant)
        _sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            _OnDevice(module, device)(**workload.probe, return_dict=False)
        _sync(device)
        row.first_call_s = time.perf_counter() - start
    for text in dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught):  # each once, in order
        # the backends' own warnings (an engine falling back, TensorRT not usable) are RuntimeWarnings
        level = logging.WARNING if text.startswith("RuntimeWarning") else logging.DEBUG
        logger.log(level, "%s: %s", variant, text)
    row.note, fallbacks = _engine_note(variant, module, before, caught)
    if fallbacks:
        row.status = "fallback"
    logger.info("%s: first call %.2f s%s", variant, row.first_call_s, f" ({row.note})" if row.note else "")
    call = workload.call_of(_OnDevice(module, device))
    first = latent = None
    # a recompile inside a timed generation would be timed as part of it: make it an error instead
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=variant != "eager"):
        for index in range(settings.runs + 1):
            what = "warm-up" if index == 0 else f"run {index}/{settings.runs}"
            _sync(device)
            start = time.perf_counter()
            latent = workload.generate(call, config)
            _sync(device)
            seconds = time.perf_counter() - start
            if index == 0:
                first = latent
            else:
                row.seconds.append(seconds)
            logger.info("%s: %s generation (%d steps): %.3f s", variant, what, settings.steps, seconds)
    row.s_per_generation = statistics.median(row.seconds)
    if device.type == "cuda":
        row.peak_memory_mib = torch.cuda.max_memory_allocated(device) / 2**20
    del module
    return row, first, latent  # type: ignore[return-value]


@contextmanager
def _caches(cold: bool) -> Iterator[Path | None]:
    """The engine cache directory for the ``sdtm`` backends: fresh Inductor and engine caches in a scratch folder
    (``cold``, :func:`~sdtm_compile.bench.harness.compiler_caches`), or the usual ones (``None``)."""
    from ..bench.harness import compiler_caches

    with ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sdtm_doctor_"))) if cold else Path()
        yield stack.enter_context(compiler_caches(cold, scratch))


def run_check(settings: CheckSettings, env: Environment) -> tuple[list[Row], str]:
    """Build the model, measure every variant of ``settings.variants``; returns the rows (table order) and a line
    describing the workload. Raises :class:`GpuUnavailableError` when the check (not a dry run) has no CUDA."""
    if not settings.dry_run and not env.cuda_available:
        raise GpuUnavailableError(
            "the GPU check needs CUDA, and torch.cuda.is_available() is False here "
            f"(torch {env.torch}). Run `sdtm-compile doctor --gpu --dry-run` to check the CPU parts."
        )
    from ..core.method import method_for

    torch.manual_seed(0)
    workload, config = _workload(settings)  # ValueError: a bad --layers / --latent / --steps
    side = settings.latent
    description = (
        f"{settings.model} ({workload.num_blocks} blocks), latent {side}x{side} = {8 * side}x{8 * side} images, "
        f"{workload.grid[0] * workload.grid[1]} image tokens, {settings.steps} steps, {workload.description}, "
        f"{str(settings.dtype).removeprefix('torch.')} on {settings.device}; "
        f"sdtm: {method_for(config.method).describe()}; "
        f"s/generation = median of {settings.runs} after 1 warm-up"
    )
    logger.info("check: %s", description)
    skip = env.tensorrt_unavailable(settings.dry_run)
    rows: list[Row] = []
    reference: torch.Tensor | None = None
    with _caches(settings.cold_caches) as cache_dir:
        for variant in settings.variants:
            if variant in TENSORRT_VARIANTS and skip is not None:
                logger.info("%s: skipped: %s", variant, skip)
                rows.append(Row(variant, VARIANT_DESCRIPTIONS[variant], status=f"skipped: {skip}"))
                continue
            try:
                row, first, latent = _measure(variant, workload, config, settings, cache_dir)
            except Exception as err:
                if variant == "eager":  # no reference: nothing else can be compared
                    raise RuntimeError(f"the eager reference failed: {type(err).__name__}: {err}") from err
                logger.exception("%s failed", variant)
                message = (str(err).strip().splitlines() or [""])[0][:300]  # the whole error is in the log
                rows.append(
                    Row(variant, VARIANT_DESCRIPTIONS[variant], status=f"failed: {type(err).__name__}: {message}")
                )
                continue
            if reference is None:  # eager's warm-up generation: its timed ones are compared with it too
                reference = first.detach().clone()
            # the last timed generation's final latent (after every other generation of the variant)
            row.max_abs_diff = (latent.float() - reference.float()).abs().max().item()
            rows.append(row)
    _release(settings.device)
    baseline = next((row for row in rows if row.variant == BASELINE and row.measured), None)
    for row in rows:
        if baseline is not None and row.s_per_generation:
            row.speedup = baseline.s_per_generation / row.s_per_generation  # type: ignore[operator]
    return rows, description


# --------------------------------------------------------------------------------------------------------------------
# the command


def _variants(text: str) -> tuple[str, ...]:
    """``"eager,sdtm"`` -> the variants in table order, ``eager`` always included (an argparse type)."""
    names = {part.strip() for part in text.split(",") if part.strip()}
    unknown = sorted(names - set(VARIANTS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown variant(s) {unknown}: choose from {', '.join(VARIANTS)}")
    return tuple(name for name in VARIANTS if name in names | {"eager"})


def register(sub: argparse._SubParsersAction) -> None:
    doctor = sub.add_parser(
        "doctor",
        help="the environment (torch, CUDA, torch-tensorrt); --gpu: the GPU check, one table",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    doctor.add_argument("--gpu", action="store_true", help="run the GPU check (every variant timed, one table)")
    doctor.add_argument(
        "--dry-run",
        action="store_true",
        help="the check on the CPU: tiny-sd3, latent 16, 2 steps, float32 unless given; TensorRT rows skipped",
    )
    doctor.add_argument("--model", default=None, help="a preset (default sd3-medium; dry run: tiny-sd3)")
    doctor.add_argument("--latent", type=int, default=None, help="latent side (default 128 = 1024x1024; dry run 16)")
    doctor.add_argument("--steps", type=int, default=None, help="steps per generation (default: the preset's, 28)")
    doctor.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default float16 (dry run float32)")
    doctor.add_argument("--layers", type=int, default=None, help="keep the first k blocks (default: all)")
    doctor.add_argument("--runs", type=int, default=3, help="timed generations per variant (median; default 3)")
    doctor.add_argument(
        "--variants", type=_variants, default=VARIANTS, help=f"comma-separated subset of {','.join(VARIANTS)}"
    )
    doctor.add_argument(
        "--cold-caches", action="store_true", help="compile in fresh Inductor and engine caches (cold first calls)"
    )
    doctor.add_argument("--json", type=Path, default=None, metavar="PATH", help="also save the report and table")
    doctor.add_argument(
        "--install",
        action="store_true",
        help="pip install torch-tensorrt matching torch when it is missing or mismatched (without: print the command)",
    )
    doctor.add_argument("--tests", action="store_true", help="run `python -m pytest -q tests -k tensorrt`")
    doctor.set_defaults(run=run)


def settings_from_args(args: argparse.Namespace) -> CheckSettings:
    """The check's settings: the options given, the rest from the GPU (or ``--dry-run``) defaults."""
    from ..models import MODEL_PRESETS

    defaults = DRY_RUN_DEFAULTS if args.dry_run else GPU_DEFAULTS
    model = args.model or defaults["model"]
    if model not in MODEL_PRESETS:
        raise ValueError(f"unknown model {model!r}: choose one of {', '.join(MODEL_PRESETS)}")
    steps = args.steps if args.steps is not None else defaults["steps"] or MODEL_PRESETS[model].steps
    if args.runs < 1:
        raise ValueError(f"--runs {args.runs}: time at least one generation")
    return CheckSettings(
        model=model,
        latent=args.latent if args.latent is not None else defaults["latent"],
        steps=steps,
        dtype=DTYPES[args.dtype or defaults["dtype"]],
        layers=args.layers,
        runs=args.runs,
        dry_run=args.dry_run,
        variants=args.variants,
        cold_caches=args.cold_caches,
    )


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    check = args.gpu or args.dry_run
    try:
        settings = settings_from_args(args) if check else None
    except ValueError as err:
        print(f"sdtm-compile doctor: {err}", file=sys.stderr)
        return 2
    env = Environment.detect()
    for line in env.lines():
        logger.info("environment: %s", line.strip())
    if settings is not None and not settings.dry_run and not env.cuda_available:
        print("\n".join(["environment", *(f"  {line}" for line in env.lines())]))
        raise SystemExit(
            "sdtm-compile doctor --gpu: CUDA is not available here (torch.cuda.is_available() is False), so the "
            "GPU check cannot run. To check its CPU parts, run: sdtm-compile doctor --gpu --dry-run"
        )
    install = install_torch_tensorrt(env, run=args.install, dry_run=args.dry_run)
    if install.ran:
        importlib.invalidate_caches()
        env = Environment.detect()
    tests = run_tensorrt_tests() if args.tests else None
    rows: list[Row] = []
    description = ""
    if settings is not None:
        try:
            rows, description = run_check(settings, env)
        except ValueError as err:  # a bad --layers / --latent / --steps (the model's or the benchmark config's check)
            print(f"sdtm-compile doctor: {err}", file=sys.stderr)
            return 2
    report = CheckReport(env, install, tests, settings, rows, description, time.perf_counter() - start)
    print(report.text())
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        logger.info("saved the report to %s", args.json)
    return 0 if report.ok else 1
