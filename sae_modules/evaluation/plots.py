"""The report's figures as PNG files (matplotlib, headless Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch import Tensor


def histogram(values: Tensor, out: str | Path, *, title: str, xlabel: str, bins: int = 50,
              log_x: bool = False) -> Path:
    """Histogram of the finite values (NaN skipped); written atomically enough for a report file."""
    finite = values[torch.isfinite(values)].double()
    if log_x:
        finite = finite[finite > 0].log10()
        xlabel = f"log10 {xlabel}"
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.hist(finite.numpy(), bins=bins, color="#3b6ea5")
    ax.set_title(f"{title} (n = {finite.numel()})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("latents")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out)
    plt.close(fig)
    return out
