"""PNG figures for the library and the experiments: one way to open, finish and save a matplotlib figure, and one
smoothing of noisy per-position curves. matplotlib is imported on first use, with the file-only Agg backend."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np


@contextmanager
def saved_figure(path: str | Path, panels: int = 1, size: tuple[float, float] = (7, 4.2),
                 legend_fontsize: float | None = None) -> Iterator[list]:
    """Yield `panels` axes side by side. On exit each gets a light grid and, if anything on it is labelled, a legend;
    the figure is saved to `path` (110 dpi) and closed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=size, squeeze=False)
    try:
        yield list(axes[0])
        for ax in axes[0]:
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=legend_fontsize)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)


def smoothed(curve: Sequence[float], points: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(x, y): the moving average of `curve` over len/points positions, each value placed at its window's centre.
    Only full windows are averaged, so the ends are not pulled towards zero."""
    window = max(1, len(curve) // points)
    ys = np.convolve(np.asarray(curve, dtype=float), np.ones(window) / window, mode="valid")
    return np.arange(len(ys)) + (window - 1) / 2, ys
