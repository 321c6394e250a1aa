"""Rendering a report into its result page: :func:`render` (after a run) and :func:`rerender` (a saved result).

A page folder (:mod:`~sdtm_compile.bench.pages`) gets ``result.json`` (every number: the report), the pictures of
the report's kind (the benchmark: ``schedule.png``, ``speedup_vs_fidelity.png``, ``merge_maps.png``; a method
comparison: ``methods.png``; a variant comparison: ``variants.png``) and ``index.md``, the page: the date measured,
the machine, the command, the tables (:func:`~sdtm_compile.bench.markdown.markdown_report`) and the pictures.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable
from pathlib import Path

from .config import RESULTS_DIR
from .markdown import markdown_report
from .pages import PAGE_FILE, Page, page_folder, write_page
from .plots import plot_merge_maps, plot_methods, plot_schedule, plot_speedup_vs_fidelity, plot_variants
from .report import KINDS, BenchReport

__all__ = ["RESULT_FILE", "page_of", "render", "rerender"]

logger = logging.getLogger("sdtm_compile.bench")

#: The report's JSON in its page folder.
RESULT_FILE = "result.json"

#: The pictures of each kind: file name -> (caption, drawing function), in page order.
PICTURES: dict[str, dict[str, tuple[str, Callable[[BenchReport, Path], str]]]] = {
    "bench": {
        "schedule.png": ("schedule", plot_schedule),
        "speedup_vs_fidelity.png": ("speedup_vs_fidelity", plot_speedup_vs_fidelity),
        "merge_maps.png": ("merge_maps", plot_merge_maps),
    },
    "methods": {"methods.png": ("methods", plot_methods)},
    "variants": {"variants.png": ("variants", plot_variants)},
}


def _draw(report: BenchReport, folder: Path) -> dict[str, str]:
    """Draw the pictures of ``report``'s kind into ``folder``; returns caption -> file name of those drawn (a
    benchmark whose method merged nothing has no merge maps to draw)."""
    drawn = {}
    for name, (caption, draw) in PICTURES[report.kind].items():
        if name == "merge_maps.png" and not report.merge_maps:
            logger.warning("no merge maps were recorded: %s is not drawn", name)
            continue
        draw(report, folder / name)
        drawn[caption] = name
    return drawn


def _relative(path: str, folder: Path) -> str:
    """``path`` as the page names it: its file name when it is in the page folder, else as given."""
    resolved = Path(path).resolve()
    return resolved.name if resolved.parent == folder.resolve() else path


def page_of(report: BenchReport, results_dir: str | Path = RESULTS_DIR, out_dir: str | Path | None = None) -> Path:
    """The folder of ``report``'s page: ``out_dir``, or the folder under ``results_dir`` named by the date measured,
    the model and the kind (:func:`~sdtm_compile.bench.pages.page_folder`)."""
    if out_dir is not None:
        return Path(out_dir)
    return page_folder(results_dir, report.measured_on, report.model.name, report.kind, report.command)


def render(report: BenchReport, results_dir: str | Path = RESULTS_DIR, out_dir: str | Path | None = None) -> Path:
    """Write ``report``'s page into its folder (:func:`page_of`) and rebuild the index of ``results_dir`` when the
    folder is in it. Records the page's files in ``report.files`` before ``result.json`` is written. Returns the
    page folder."""
    model = report.model.name
    folder = page_of(report, results_dir, out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    if report.source is not None:
        report.source = _relative(report.source, folder)
    pictures = _draw(report, folder)
    report.files = {"page": PAGE_FILE, "json": RESULT_FILE, **pictures}
    (folder / RESULT_FILE).write_text(report.to_json())
    files = {RESULT_FILE: "every number of this page"}
    if report.source is not None and (folder / report.source).exists() and report.source != RESULT_FILE:
        files[report.source] = "the measurement as it was first saved"
    page = Page(
        title=f"{model}: {KINDS[report.kind]}",
        kind=report.kind,
        model=model,
        measured_on=report.measured_on,
        machine=None if report.machine is None else report.machine.to_dict(),
        command=report.command,
        body=markdown_report(report),
        pictures=pictures,
        files=files,
        wall_time_s=report.wall_time_s,
        rerendered_on=report.rerendered_on,
        source=report.source,
    )
    write_page(page, folder, results_dir)
    logger.info("wrote the page %s", folder / PAGE_FILE)
    return folder


def rerender(
    path: str | Path,
    results_dir: str | Path = RESULTS_DIR,
    out_dir: str | Path | None = None,
    measured_on: str | None = None,
) -> BenchReport:
    """Read the result saved at ``path`` (any layout) and render its page again, marked as re-rendered today.

    ``measured_on``: the date of a result that did not record it (e.g. from the version history of its file);
    a result that recorded one keeps it (a different ``measured_on`` is a ``ValueError``). Returns the report.
    """
    report = BenchReport.load(path)
    if measured_on is not None:
        datetime.date.fromisoformat(measured_on)  # a malformed date fails here, not in a folder name
        if report.measured_on not in (None, measured_on):
            raise ValueError(f"{path} was measured on {report.measured_on}, not {measured_on}")
        report.measured_on = measured_on
    report.rerendered_on = datetime.date.today().isoformat()
    render(report, results_dir, out_dir)
    return report
