"""Read a run folder and plot its reward and KL curves to one PNG.

Every textenv learner (PPO, the baselines, the benchmark's SB3 runs) writes ``metrics.jsonl`` in its run
folder: one JSON object per iteration with at least ``iteration``, ``score`` (the env's reward: RM or
rule) and ``kl`` (KL to the reference per episode), plus ``gold`` on tasks with a hidden gold reward.
Reading it needs nothing but ``json``; plotting it, matplotlib.
Run: ``python examples/plot_run.py RUN_DIR [--out curves.png]``.
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # write files; no display needed
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(run_dir: Path) -> list[dict]:
    """One dict per iteration, from ``run_dir/metrics.jsonl``."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def plot(metrics: list[dict], out: Path) -> Path:
    """Reward (RM / env score, and gold if recorded) on the left, KL on the right."""
    x = [m["iteration"] for m in metrics]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(x, [m["score"] for m in metrics], marker=".", label="score (the env's reward)")
    if "gold" in metrics[0]:
        left.plot(x, [m["gold"] for m in metrics], marker=".", label="gold reward")
    right.plot(x, [m["kl"] for m in metrics], marker=".", color="tab:red")
    left.set_title("reward")
    right.set_title("KL(π ‖ π_ref) per episode")
    for ax in (left, right):
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    left.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run folder holding metrics.jsonl")
    parser.add_argument("--out", type=Path, help="PNG to write (default: RUN_DIR/curves.png)")
    args = parser.parse_args()
    metrics = read_metrics(args.run_dir)
    last = metrics[-1]
    print(f"{len(metrics)} iterations; last: score {last['score']:.3f}, KL {last['kl']:.3f}")
    print("wrote", plot(metrics, args.out or args.run_dir / "curves.png"))
