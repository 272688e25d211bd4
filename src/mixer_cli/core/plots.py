"""Figures as PNG files: matplotlib without a display, written atomically."""
from __future__ import annotations

import io
from pathlib import Path

from mixer_cli.core.files import write_atomic


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display on servers and CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int = 120) -> None:
    """The figure as a PNG, written atomically, then closed."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    pyplot().close(fig)
    write_atomic(path, buffer.getvalue())
