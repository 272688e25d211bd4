"""The confusion matrix of `mixer eval` as a PNG a person reads."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mixer_cli.core.plots import pyplot, save_figure

NAMED_AXES_MAX_CLASSES = 50  # beyond this, names on the axes overlap: the axes show class indices
COUNTED_CELLS_MAX_CLASSES = 20  # beyond this, a count no longer fits in its cell
LABEL_CHARS = 24  # ImageNet's descriptions run to 80 characters ("tench, Tinca tinca", ...)


def plot_confusion_matrix(matrix: np.ndarray, names: list[str], out: Path, title: str) -> None:
    """Rows: true class, columns: predicted. Colours are row-normalised (each true class's images share 1),
    so a rare class's mistakes show as clearly as a common one's; small matrices print the counts."""
    k = len(names)
    support = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, support, out=np.zeros(matrix.shape), where=support > 0)
    side = min(4 + 0.3 * k, 18) if k <= NAMED_AXES_MAX_CLASSES else 12
    fig, ax = pyplot().subplots(figsize=(side + 1.5, side))
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class's images")
    if k <= NAMED_AXES_MAX_CLASSES:
        labels = [shortened(name) for name in names]
        ax.set_xticks(range(k), labels, rotation=90)
        ax.set_yticks(range(k), labels)
    if k <= COUNTED_CELLS_MAX_CLASSES:
        for (row, col), count in np.ndenumerate(matrix):
            ax.text(col, row, f"{count:,}", ha="center", va="center", fontsize=8,
                    color="white" if shares[row, col] > 0.5 else "black")
    axis = "class" if k <= NAMED_AXES_MAX_CLASSES else "class (index; names in per_class.csv)"
    ax.set(xlabel=f"predicted {axis}", ylabel=f"true {axis}",
           title=f"{title}\ncolour: row-normalised (share of each true class)"
                 + ("; numbers: image counts" if k <= COUNTED_CELLS_MAX_CLASSES else ""))
    fig.tight_layout()
    save_figure(fig, out)


def shortened(name: str) -> str:
    return name if len(name) <= LABEL_CHARS else name[:LABEL_CHARS - 1] + "…"
