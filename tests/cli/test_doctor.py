"""``sdtm-compile doctor``: the environment report, the GPU check's dry run on the CPU, ``--install`` and ``--tests``
where no GPU is, and ``scripts/gpu_check.sh``. The GPU parts themselves (TensorRT rows, CUDA timing and memory) cannot
run here: the dry run reports them as skipped, and these tests check that it says so."""

import contextlib
import importlib.metadata
import importlib.util
import io
import json
import math
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from sdtm_compile.cli import main
from sdtm_compile.cli.doctor import (
    VARIANTS,
    CheckReport,
    Environment,
    InstallResult,
    Row,
    _engine_note,
    format_table,
    run_tensorrt_tests,
)

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
MEASURED = ("eager", "inductor", "sdtm")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens on a machine without CUDA")


def _torch_tensorrt_installed() -> str | None:
    try:
        return importlib.metadata.version("torch-tensorrt")
    except importlib.metadata.PackageNotFoundError:
        return None


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One ``sdtm-compile doctor --gpu --dry-run --json PATH`` in this process: exit status, stdout, the JSON report
    and the wall time. Its Inductor and sdtm builds make the tests that use it the ``inductor`` lane's."""
    path = tmp_path_factory.mktemp("doctor") / "report.json"
    out = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out):
        code = main(["doctor", "--gpu", "--dry-run", "--json", str(path)])
    return code, out.getvalue(), json.loads(path.read_text()), time.perf_counter() - start


def _rows(report: dict) -> dict[str, dict]:
    return {row["variant"]: row for row in report["rows"]}


@pytest.mark.inductor
def test_dry_run_measures_every_variant_the_cpu_can_run(dry_run):
    code, out, report, _ = dry_run
    assert code == 0
    rows = _rows(report)
    assert tuple(rows) == VARIANTS
    for name in MEASURED:
        row = rows[name]
        assert row["status"] == "ok", row
        assert row["first_call_s"] > 0
        assert len(row["seconds"]) == 3 and row["s_per_generation"] == sorted(row["seconds"])[1]
        assert row["speedup"] > 0
        assert row["peak_memory_mib"] is None  # the CPU has no GPU memory to report
        assert math.isfinite(row["max_abs_diff"])
    assert rows["eager"]["max_abs_diff"] == 0.0  # the reference against itself (a later generation)
    assert rows["inductor"]["speedup"] == pytest.approx(1.0)  # the baseline
    assert "inductor engines" in rows["sdtm"]["note"]
    settings = report["settings"]
    assert (settings["model"], settings["latent"], settings["steps"], settings["dtype"]) == (
        "tiny-sd3",
        16,
        2,
        "float32",
    )
    assert report["baseline"] == "inductor (plain torch.compile)"
    # the printed table: one line per measured variant with its numbers and n/a for GPU memory
    lines = {line.split()[0]: line for line in out.splitlines() if line.split(" ")[0] in VARIANTS}
    for name in MEASURED:
        assert "n/a" in lines[name] and " ok" in lines[name]
        assert f"{rows[name]['first_call_s']:.2f}" in lines[name]
    assert lines["eager"].split()[5] == "0"  # max |diff| of eager to itself


@pytest.mark.inductor
def test_dry_run_reports_the_trt_rows_as_skipped_with_the_reason(dry_run):
    _, out, report, _ = dry_run
    rows = _rows(report)
    for name in ("tensorrt", "sdtm_trt"):
        row = rows[name]
        assert row["status"].startswith("skipped: "), row
        assert "dry run on the CPU" in row["status"]
        if not torch.cuda.is_available():
            assert "CUDA is not available" in row["status"]
        if _torch_tensorrt_installed() is None:
            assert "torch-tensorrt is not installed" in row["status"]
        assert all(row[key] is None for key in ("first_call_s", "s_per_generation", "speedup", "max_abs_diff"))
        assert row["seconds"] == []
        line = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert "skipped: " in line
    assert report["gpu_parts_ran"] is False
    assert "DRY RUN: no GPU part of the check ran" in out


@pytest.mark.inductor
def test_json_saves_the_printed_table(dry_run):
    _, out, report, _ = dry_run
    assert report["table"] in out
    assert format_table([Row(**row) for row in report["rows"]]) == report["table"]
    assert report["environment"]["torch"] == torch.__version__
    assert report["install"]["ran"] is False


@pytest.mark.unit
def test_environment_matches_torch_trt_by_major_minor():
    def env(torch_version: str, trt: str | None, cuda: bool = True) -> Environment:
        return Environment(
            "3.11", "linux", torch_version, cuda, "13.0" if cuda else None, "GPU" if cuda else None, trt, None
        )

    matching = env("2.13.0+cu130", "2.13.0")
    assert matching.torch_tensorrt_matches and matching.install_command() is None
    assert matching.tensorrt_unavailable(dry_run=False) is None
    assert "dry run" in matching.tensorrt_unavailable(dry_run=True)
    old = env("2.13.1", "2.12.0")
    assert not old.torch_tensorrt_matches
    assert old.install_command()[-1] == "torch-tensorrt==2.13.*"
    assert "torch-tensorrt 2.12.0 does not match torch 2.13.1" in old.tensorrt_unavailable(dry_run=False)
    missing = env("2.14.0.dev20260101+cpu", None, cuda=False)
    assert missing.install_command()[-1] == "torch-tensorrt==2.14.*"
    reason = missing.tensorrt_unavailable(dry_run=False)
    assert "CUDA is not available (a CPU build of torch)" in reason and "torch-tensorrt is not installed" in reason


@pytest.mark.unit
def test_a_trt_build_that_fell_back_to_inductor_is_flagged_not_hidden():
    def warning(text: str) -> warnings.WarningMessage:
        return warnings.WarningMessage(RuntimeWarning(text), RuntimeWarning, "backend.py", 1)

    # the sdtm_trt backend's own warnings (sdtm_compile/compiler/backend.py)
    caught = [
        warning(
            "building the tensorrt engine for detail@0.3 failed (RuntimeError: x); falling back to inductor for "
            "this engine"
        ),
        warning("sdtm_trt: TensorRT is not usable here: no CUDA. Building Inductor engines instead."),
        warning("something else"),
    ]
    note, fallbacks = _engine_note("sdtm_trt", torch.nn.Linear(2, 2), set(), caught)
    assert fallbacks == 2 and "2 TensorRT build(s) FELL BACK to Inductor" in note
    assert _engine_note("inductor", torch.nn.Linear(2, 2), set(), caught) == ("", 0)
    row = Row("sdtm_trt", "", status="fallback", first_call_s=1.0, seconds=[1.0], s_per_generation=1.0, note=note)
    assert row.measured
    assert "fallback (2 TensorRT build(s) FELL BACK" in format_table([row])
    env = Environment("3.11", "linux", "2.13.0+cu130", True, "13.0", "GPU", "2.13.0", "11.0")
    report = CheckReport(env, InstallResult(None, False, None, "nothing to install"), None, None, [row])
    assert not report.ok  # the exit status says the check did not pass


@pytest.mark.unit
@no_cuda
def test_install_without_cuda_prints_the_command_and_installs_nothing(capsys):
    before = _torch_tensorrt_installed()
    wanted = ".".join(torch.__version__.split(".")[:2])
    assert main(["doctor", "--install"]) == 0
    out = capsys.readouterr().out
    if before is not None and before.startswith(wanted + "."):
        assert "nothing to install" in out
        return
    assert f"-m pip install 'torch-tensorrt=={wanted}.*'" in out
    assert "not run: CUDA is not available" in out
    assert _torch_tensorrt_installed() == before
    assert (importlib.util.find_spec("torch_tensorrt") is None) == (before is None)
    # without --install the command is printed, never run
    assert main(["doctor"]) == 0
    assert "not run (pass --install to run it)" in capsys.readouterr().out


@pytest.mark.unit
@no_cuda
def test_gpu_check_without_cuda_is_a_clear_error_naming_the_dry_run(capsys):
    with pytest.raises(SystemExit, match="CUDA is not available") as exit_info:
        main(["doctor", "--gpu", "--install", "--tests"])
    assert "sdtm-compile doctor --gpu --dry-run" in str(exit_info.value.code)
    assert "torch.cuda.is_available() is False" in capsys.readouterr().out  # the environment report came first


@pytest.mark.unit
def test_bad_options_are_clear_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["doctor", "--gpu", "--dry-run", "--variants", "eager,tome"])
    assert exit_info.value.code == 2
    assert "unknown variant(s) ['tome']" in capsys.readouterr().err
    assert main(["doctor", "--dry-run", "--model", "sd4"]) == 2
    assert "unknown model 'sd4'" in capsys.readouterr().err
    assert main(["doctor", "--dry-run", "--runs", "0"]) == 2


@pytest.mark.slow
@no_cuda
def test_gpu_check_exits_non_zero_from_the_console(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "sdtm_compile", "doctor", "--gpu"], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 1
    assert "sdtm-compile doctor --gpu --dry-run" in result.stderr


@pytest.mark.slow
def test_tests_option_runs_pytest_and_reports_the_outcome(tmp_path):
    (tmp_path / "test_sample.py").write_text(
        "def test_tensorrt_parity():\n    pass\n\ndef test_something_else():\n    raise AssertionError\n"
    )
    passed = run_tensorrt_tests(tmp_path, paths=("test_sample.py",))
    assert passed.command[-2:] == ["-k", "tensorrt"]
    assert passed.status == "passed" and passed.ok
    assert "1 passed" in passed.summary and "1 deselected" in passed.summary
    failed = run_tensorrt_tests(tmp_path, paths=("test_sample.py",), keyword="else")
    assert failed.status == "FAILED" and not failed.ok
    assert "1 failed" in failed.summary


@pytest.mark.slow
def test_gpu_check_script_is_valid_bash_and_stops_without_a_gpu(tmp_path):
    assert SCRIPT.is_file()
    result = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    if shutil.which("nvidia-smi") is not None:
        return  # a GPU machine: running the script would install packages
    # without nvidia-smi the script stops before installing anything, and says what to run instead
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode != 0
    assert "nvidia-smi" in result.stderr
    assert "sdtm-compile doctor --gpu --dry-run" in result.stderr
