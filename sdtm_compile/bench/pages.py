"""Result pages: one folder per measured result under a results folder, and a generated index of them.

A page folder (``<date>-<model>-<kind>``, e.g. ``2026-12-04-sd3m-1024-methods``) holds the page (``index.md``: the
date measured, the machine, the command, the tables and the pictures), its pictures, the result's JSON and
``page.json``, what the index lists of it. Every time a page is written the results folder's ``index.md`` is
rebuilt from all the ``page.json`` files under it, so it lists every page and is never written by hand. Any
command that measures something can publish this way (:func:`write_page`): ``sdtm-compile bench`` and
``sdtm-compile serve-bench`` do.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "INDEX_FILE",
    "META_FILE",
    "PAGE_FILE",
    "Page",
    "machine_line",
    "page_folder",
    "update_index",
    "write_page",
    "write_run_page",
]

logger = logging.getLogger(__name__)

#: The page's markdown in its folder, its metadata for the index, and the index in the results folder.
PAGE_FILE = "index.md"
META_FILE = "page.json"
INDEX_FILE = "index.md"


@dataclass
class Page:
    """One result page.

    Attributes:
        title: the page's heading.
        kind: what was measured (``bench``, ``methods``, ``variants``, ``serve``...): part of the folder name.
        model: the model measured: part of the folder name.
        measured_on: the date of the measurement (``YYYY-MM-DD``), ``None`` where it was not recorded.
        machine: where it ran (``cpu``, ``cores``, ``torch``, ``python``, ...), ``None`` where not recorded.
        command: the command line that measured it.
        body: the tables, in markdown.
        pictures: caption -> picture file in the page folder, shown under the tables.
        files: file in the page folder -> what it holds, listed at the end.
        wall_time_s: how long the measurement took.
        rerendered_on: the date the page was drawn again from the saved result (``None``: written by the run).
        source: the saved result it was drawn from, for a re-rendered page.
    """

    title: str
    kind: str
    model: str
    measured_on: str | None
    machine: Mapping[str, Any] | None
    command: str | None
    body: str
    pictures: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    wall_time_s: float | None = None
    rerendered_on: str | None = None
    source: str | None = None


def machine_line(machine: Mapping[str, Any] | None) -> str:
    """The machine in words: CPU model, cores, torch threads, torch and Python versions ("not recorded" for
    ``None``)."""
    if not machine:
        return "a machine that was not recorded"
    threads = f" ({machine['torch_threads']} torch threads)" if machine.get("torch_threads") else ""
    return (
        f"{machine.get('cpu', 'an unnamed CPU')}, {machine.get('cores', '?')} cores{threads}, "
        f"torch {machine.get('torch', '?')}, Python {machine.get('python', '?')}"
    )


def _slug(text: str) -> str:
    """``text`` as a folder-name part: letters, digits, dots and dashes."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-") or "model"


def page_folder(results_dir: str | Path, measured_on: str | None, model: str, kind: str, command: str | None) -> Path:
    """The folder of a page under ``results_dir``: ``<date>-<model>-<kind>`` (``undated`` without a date), or with
    ``-2``, ``-3``, ... when that folder holds a page of another command (a re-rendered result, or the same command
    run again that day, replaces its page)."""
    base = f"{measured_on or 'undated'}-{_slug(Path(model).name)}-{_slug(kind)}"
    for number in itertools.count(1):
        folder = Path(results_dir) / (base if number == 1 else f"{base}-{number}")
        meta = folder / META_FILE
        if not meta.exists() or json.loads(meta.read_text()).get("command") == command:
            return folder
    raise AssertionError("unreachable")


def _markdown(page: Page, others: list[str]) -> str:
    """The page's markdown (``others``: files in its folder that the page did not write, listed at the end)."""
    measured = f"Measured on {page.measured_on}" if page.measured_on else "Measured on a date that was not recorded"
    lines = [f"# {page.title}", "", f"{measured} on {machine_line(page.machine)}."]
    if page.rerendered_on:
        source = f" from `{page.source}`" if page.source else ""
        lines[-1] += (
            f" Re-rendered on {page.rerendered_on}{source}: the numbers are the saved measurement's, the tables and "
            "pictures were drawn again."
        )
    if page.command:
        took = f" ({page.wall_time_s / 60:.0f} min)" if page.wall_time_s else ""
        # as it was typed then: an older page's command may carry options the CLI has since dropped
        lines += ["", f"Command, as run: `{page.command}`{took}"]
    lines += ["", page.body.rstrip("\n"), ""]
    lines += [f"![{caption}]({name})" for caption, name in page.pictures.items()]
    if page.files:
        lines += ["", "Files: " + "; ".join(f"[{name}]({name}): {what}" for name, what in page.files.items()) + "."]
    if others:
        lines += ["", "Also in this folder: " + ", ".join(f"[{name}]({name})" for name in others) + "."]
    return "\n".join(lines) + "\n"


def write_page(page: Page, folder: str | Path, results_dir: str | Path) -> Path:
    """Write ``page`` into ``folder`` (``index.md`` and ``page.json``; the pictures and data are the caller's), then
    rebuild the index of ``results_dir`` when ``folder`` is directly under it. Returns the page's markdown file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / PAGE_FILE
    own = {PAGE_FILE, META_FILE, *page.files, *page.pictures.values()}
    others = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name not in own)
    path.write_text(_markdown(page, others))
    meta = {key: value for key, value in asdict(page).items() if key != "body"}  # the index needs no tables
    (folder / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    if folder.resolve().parent == Path(results_dir).resolve():
        update_index(results_dir)
    else:
        logger.info("%s is not a folder of %s: its index is left as it is", folder, results_dir)
    return path


def write_run_page(folder: Path, seconds: float, **fields: Any) -> Path:
    """A page of the measurement this process just made, into ``folder`` (under the results folder it indexes):
    today's date, this machine, this process's command line and ``seconds`` of wall time; ``fields``: the rest of
    :class:`Page` (title, kind, model, body, pictures, files)."""
    import sys
    import time

    from .record import machine_info

    page = Page(
        measured_on=time.strftime("%Y-%m-%d"),
        machine=machine_info().__dict__,
        command="python " + " ".join(sys.argv),
        wall_time_s=round(seconds, 1),
        **fields,
    )
    return write_page(page, folder, folder.parent)


def update_index(results_dir: str | Path) -> Path:
    """Rebuild ``results_dir/index.md`` from every page under it (newest first); returns its path."""
    root = Path(results_dir)
    pages = []
    for meta in sorted(root.glob(f"*/{META_FILE}")):
        values = json.loads(meta.read_text())
        pages.append((values.get("measured_on") or "", meta.parent.name, values))
    pages.sort(key=lambda entry: (entry[0], entry[1]), reverse=True)
    lines = [
        "# Results",
        "",
        "Every measured result, one page each, newest first. Generated: `sdtm-compile bench` and "
        "`sdtm-compile serve-bench` (and their `--from-json` re-rendering) rewrite this list whenever they write a "
        "page.",
        "",
        "| measured | page | machine |",
        "|---|---|---|",
    ]
    for measured_on, name, values in pages:
        note = f" (re-rendered {values['rerendered_on']})" if values.get("rerendered_on") else ""
        lines.append(
            f"| {measured_on or 'not recorded'} | [{values.get('title', name)}]({name}/{PAGE_FILE}){note} "
            f"| {machine_line(values.get('machine'))} |"
        )
    path = root / INDEX_FILE
    root.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path
