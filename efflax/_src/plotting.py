"""The one way efflax's plots are finished: title, tight layout, PNG, figure closed."""

from __future__ import annotations

import pathlib
from typing import Any


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: pathlib.Path | str, *, title: str = "") -> pathlib.Path:
    """Titles ``fig`` (when ``title``), saves it as a PNG at ``path`` and closes it."""
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return pathlib.Path(path)
