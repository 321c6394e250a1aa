"""matplotlib for the package's pictures, headless (Agg), with a clear error where it is not installed."""

from __future__ import annotations

from typing import Any

__all__ = ["pyplot"]


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (``pip install 'sdtm-compile[examples]'`` installs matplotlib)."""
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("the pictures need matplotlib: pip install 'sdtm-compile[examples]'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
