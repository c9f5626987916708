"""Learning curves of a run directory (``metrics.jsonl``) as a PNG."""

from __future__ import annotations

import json
from pathlib import Path


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Reward (guided vs π_ref), KL to π_ref and value-fit loss per iteration; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    file = run_dir / "metrics.jsonl"
    if not file.exists():
        raise FileNotFoundError(f"{file} not found: is {run_dir} a run directory of `qsharp train`?")
    history = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    if not history:
        raise ValueError(f"{file} has no iterations yet")
    it = [h["iteration"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    axes[0].plot(it, [h["guided_reward"] for h in history], "o-", label="Q♯-guided")
    axes[0].plot(it, [h["ref_reward"] for h in history], "s--", color="C7", label="π_ref")
    axes[0].set(title="evaluation reward", xlabel="iteration", ylim=(-0.02, 1.02))
    axes[0].legend()
    axes[1].plot(it, [h["guided_kl"] for h in history], "o-")
    axes[1].set(title="KL(π ‖ π_ref) per sequence", xlabel="iteration")
    axes[2].plot(it, [h["fit_loss"] for h in history], "o-", color="C3")
    axes[2].set(title="value-model fit loss (last epoch)", xlabel="iteration")
    for ax in axes:
        ax.set_xticks(it)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out) if out is not None else run_dir / "learning_curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
