"""Plots of an accuracy matrix (matplotlib, headless): a heatmap and each task's accuracy over the stream."""

from __future__ import annotations

import os
from typing import Optional, Sequence


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("Plots need matplotlib: pip install 'peft-ext[demo]' (or run with --plots false).") from None
    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_heatmap(
    matrix: Sequence[Sequence[Optional[float]]],
    tasks: Sequence[str],
    path: str | os.PathLike,
    title: str = "",
    zero_shot: Optional[Sequence[float]] = None,
) -> None:
    """Heatmap of a_ij in percent (row: after training task i, column: task j); cells not evaluated blank. With
    ``zero_shot`` (each task's accuracy before any training), that row comes first, labelled "zero-shot", under a
    line that sets it apart from the rows after training."""
    plt = _pyplot()
    import numpy as np

    n = len(tasks)
    rows = ([list(zero_shot)] if zero_shot is not None else []) + [list(row) for row in matrix]
    labels = (["zero-shot"] if zero_shot is not None else []) + [f"after {t}" for t in tasks]
    data = np.array([[np.nan if v is None else 100.0 * v for v in row] for row in rows], dtype=float)
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * n, 1.2 + 0.9 * len(rows)), dpi=120)
    image = ax.imshow(np.ma.masked_invalid(data), vmin=0, vmax=100, cmap="viridis")
    if zero_shot is not None:
        ax.axhline(0.5, color="white", linewidth=3)
    for i in range(len(rows)):
        for j in range(n):
            if not np.isnan(data[i, j]):
                ax.text(
                    j, i, f"{data[i, j]:.1f}", ha="center", va="center", color="white" if data[i, j] < 60 else "black"
                )
    ax.set_xticks(range(n), tasks, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), labels)
    ax.set_xlabel("evaluated task")
    ax.set_title(f"accuracy (%) {title}".strip())
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_accuracy_curves(
    matrix: Sequence[Sequence[Optional[float]]], tasks: Sequence[str], path: str | os.PathLike, title: str = ""
) -> None:
    """One line per task: its accuracy (percent) after each training stage from the stage it was learned."""
    plt = _pyplot()
    n = len(tasks)
    fig, ax = plt.subplots(figsize=(2.5 + 1.0 * n, 3.5), dpi=120)
    for j, name in enumerate(tasks):
        xs = [i for i in range(n) if matrix[i][j] is not None]
        ax.plot(xs, [100.0 * matrix[i][j] for i in xs], marker="o", label=name)
    ax.set_xticks(range(n), [f"after {t}" for t in tasks], rotation=30, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(f"accuracy over the stream {title}".strip())
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


__all__ = ["plot_accuracy_curves", "plot_accuracy_heatmap"]
