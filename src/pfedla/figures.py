"""The α heatmap, drawn one way everywhere: in the report and in the MLflow artifacts of a run."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure


def alpha_heatmap_figure(alpha: np.ndarray, order: Sequence[int], names: Sequence[str], title: str) -> Figure:
    """One heatmap per layer of α [client, layer, source client], rows and columns in ``order``."""
    layers = alpha.shape[1]
    figure = Figure(figsize=(3.6 * layers + 0.5, 3.8), layout="constrained")
    axes = np.atleast_1d(figure.subplots(1, layers))
    ticks = [str(c) for c in order] if len(order) <= 40 else None
    top = max(float(alpha.max()), 1e-6)
    for layer, ax in enumerate(axes):
        image = ax.imshow(alpha[:, layer, :][np.ix_(order, order)], vmin=0.0, vmax=top, cmap="viridis")
        ax.set_title(names[layer], fontsize=9)
        ax.set(xlabel="source client j", ylabel="client i" if layer == 0 else None)
        if ticks is not None:
            ax.set_xticks(range(len(order)), ticks, fontsize=6, rotation=90)
            ax.set_yticks(range(len(order)), ticks, fontsize=6)
    figure.colorbar(image, ax=list(axes), fraction=0.02)
    figure.suptitle(title, fontsize=10)
    return figure


def png_bytes(figure: Figure, dpi: int = 100) -> bytes:
    """``figure`` as PNG (matplotlib's object API: no global pyplot state, safe in any thread)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()
