"""The PNG report of a PPO run: reward and KL curves of every policy."""

from __future__ import annotations

import os
from pathlib import Path


def plot_ppo(records: list[dict], out: str | os.PathLike) -> Path | None:
    """Reward mean and KL per step for each policy, from the run's metrics records."""
    rows = [r for r in records if r.get("stage") == "ppo" and "step" in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = sorted({k.split("/")[0] for r in rows for k in r if k.endswith("/reward/mean")})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in policies:
        steps = [r["step"] for r in rows if f"{name}/reward/mean" in r]
        axes[0].plot(steps, [r[f"{name}/reward/mean"] for r in rows if f"{name}/reward/mean" in r], label=name)
        axes[1].plot(steps, [r[f"{name}/kl/mean"] for r in rows if f"{name}/kl/mean" in r], label=name)
    for ax, title in zip(axes, ("reward (mean score per rollout)", "KL to reference (per sequence)")):
        ax.set_title(title)
        ax.set_xlabel("PPO step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)
    return out
