"""Updating a README's Results section from a benchmark result, as a step of its own.

The README marks the block to replace with ``<!-- bench:start -->`` and ``<!-- bench:end -->`` (Flux models:
``<!-- bench-flux:start -->`` / ``<!-- bench-flux:end -->``; the trained testbed: ``<!-- bench-testbed:start -->`` /
``<!-- bench-testbed:end -->``);
:func:`update_readme` puts the command line, the wall time, the tables of
:func:`~sdtm_compile.bench.markdown_report` and links to the pictures (relative to the README) between them.
``sdtm-compile bench --update-readme README.md`` runs it after the benchmark (or after ``--from-json``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .report import markdown_report
from .result import BenchResult, as_bench_result

__all__ = [
    "FLUX_END",
    "FLUX_START",
    "README_END",
    "README_START",
    "TESTBED_END",
    "TESTBED_START",
    "readme_markers",
    "results_block",
    "update_readme",
]

README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"
#: Flux results have a block of their own, so each model family's table is updated by its own run.
FLUX_START, FLUX_END = "<!-- bench-flux:start -->", "<!-- bench-flux:end -->"
TESTBED_START, TESTBED_END = "<!-- bench-testbed:start -->", "<!-- bench-testbed:end -->"


def readme_markers(model: str) -> tuple[str, str]:
    """The README block a result of ``model`` (a preset name) goes to."""
    if model.startswith("testbed"):
        return TESTBED_START, TESTBED_END
    return (FLUX_START, FLUX_END) if model.startswith(("flux", "tiny-flux")) else (README_START, README_END)


#: The pictures linked under the tables, by their key in ``BenchResult.files``.
_PICTURES = ("schedule", "speedup_vs_fidelity", "merge_maps")


def results_block(result: BenchResult | Mapping[str, Any], readme: str | Path, out_dir: str | Path) -> str:
    """The README block, markers included, for a rendered ``result`` whose files are in ``out_dir``."""
    result = as_bench_result(result)
    rel = Path(os.path.relpath(out_dir, Path(readme).parent))
    pictures = "\n".join(f"![{name}]({(rel / result.files[name]).as_posix()})" for name in _PICTURES)
    start, end = readme_markers(result.model.name)
    return (
        f"{start}\n`{result.command or 'sdtm-compile bench'}` "
        f"({result.wall_time_s / 60:.0f} min):\n\n{markdown_report(result)}\n{pictures}\n{end}"
    )


def update_readme(readme: str | Path, result: BenchResult | Mapping[str, Any], out_dir: str | Path) -> None:
    """Replace the text between the README's bench markers with the tables and the pictures.

    ``result`` must have been rendered into ``out_dir`` (:func:`~sdtm_compile.bench.render` records its files).
    Raises ``ValueError`` when the README has no marked block.
    """
    readme = Path(readme)
    text = readme.read_text()
    start, end = readme_markers(as_bench_result(result).model.name)
    if start not in text or end not in text:
        raise ValueError(f"{readme} has no {start} ... {end} block to replace")
    block = results_block(result, readme, out_dir)
    head, rest = text.split(start, 1)
    readme.write_text(head + block + rest.split(end, 1)[1])
