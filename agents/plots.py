"""PNG plots of a run's metrics: the four curves an RLHF run is judged by (reward, gold, KL, β)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

PLOTTED = {
    "score": "reward-model score",
    "gold": "gold reward",
    "kl": "KL(π ‖ π_ref) per episode",
    "kl_coef": "KL coefficient β",
}


def plot_metrics(metrics: Sequence[dict[str, float]], out_dir: str | Path) -> list[Path]:
    """One PNG per plotted metric present in ``metrics`` (iteration on the x axis); returns the paths.

    Draws on `matplotlib.figure.Figure` objects, not pyplot: no backend is switched and no global figure state
    touched in the caller's process, and matplotlib is imported only here, when a run writes its plots.
    """
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    x = [m["iteration"] for m in metrics]
    for key, title in PLOTTED.items():
        if not metrics or key not in metrics[0]:
            continue
        fig = Figure(figsize=(5, 3.2), dpi=100)
        ax = fig.subplots()
        ax.plot(x, [m[key] for m in metrics], marker=".")
        ax.set_xlabel("PPO iteration")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"{key}.png"
        fig.savefig(path)
        paths.append(path)
    return paths
