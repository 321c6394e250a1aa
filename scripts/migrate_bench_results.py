"""One-off: turn the result folders of ``examples/bench_results*`` into result pages under ``docs/results``.

    python scripts/migrate_bench_results.py [--dry-run]

For each folder: the date it was measured is the date its JSON was last committed (``git log -1 --format=%cs``:
the JSON itself does not record it); the command's re-render path (``sdtm-compile bench --from-json`` or
``sdtm-compile serve-bench --from-json``, with ``--measured-on``) names the page folder; every file of the old folder
is moved there with ``git mv`` (the saved JSON keeps its name as the page's source, the old markdown becomes the
page's ``index.md``); then the page is rendered again from the moved JSON, which rewrites the page, its pictures,
its ``result.json`` and the results index. A folder without a saved result is left alone. Run from the repository
root with the package importable; nothing is committed.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path

logger = logging.getLogger("migrate_bench_results")

#: The saved result of each kind of folder, the command that re-renders it, and its old markdown.
SAVED = {
    "bench.json": ("bench", "bench.md"),
    "methods.json": ("bench", "methods.md"),
    "variants.json": ("bench", "variants.md"),
    "load.json": ("serve-bench", "load.md"),
}
RESULTS = Path("docs/results")


def git(*args: str) -> str:
    """Run git with ``args``; returns its output (a failure stops the script)."""
    return subprocess.run(["git", *args], check=True, capture_output=True, text=True).stdout.strip()


def rerender(command: str, saved: Path, measured_on: str, out: Path | None = None) -> Path:
    """Re-render ``saved`` with ``sdtm-compile COMMAND --from-json``; returns the page folder it names."""
    argv = [sys.executable, "-m", "sdtm_compile", command, "--from-json", str(saved), "--measured-on", measured_on]
    argv += ["--results", str(RESULTS)] + (["--out", str(out)] if out is not None else [])
    done = subprocess.run(argv, check=True, capture_output=True, text=True)
    last = done.stdout.strip().splitlines()[-1]  # "wrote ... to FOLDER"
    return Path(last.rsplit(" to ", 1)[1])


def migrate(folder: Path, dry_run: bool) -> None:
    """Move ``folder``'s files into their page folder and render the page from them."""
    found = [name for name in SAVED if (folder / name).exists()]
    if not found:
        logger.info("%s: no saved result, left alone", folder)
        return
    name = found[0]
    command, old_markdown = SAVED[name]
    measured_on = git("log", "-1", "--format=%cs", "--", str(folder / name))
    if dry_run:
        logger.info("%s: %s measured on %s (dry run: nothing moved)", folder, name, measured_on)
        return
    page = rerender(command, folder / name, measured_on)  # names (and first fills) the page folder
    for path in sorted(folder.iterdir()):
        target = page / ("index.md" if path.name == old_markdown else path.name)
        git("mv", "-f", str(path), str(target))  # -f: over the first render's files, so their history follows
    rerender(command, page / name, measured_on, page)
    folder.rmdir()
    logger.info("%s -> %s (measured on %s)", folder, page, measured_on)


def main() -> None:
    """Migrate every ``examples/bench_results*`` folder (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="only say what would move where")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for folder in sorted(Path("examples").glob("bench_results*")):
        if folder.is_dir():
            migrate(folder, args.dry_run)


if __name__ == "__main__":
    main()
