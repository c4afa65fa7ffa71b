"""The PNG report of a PPO run: reward, KL and the text's diversity and repetition for every policy."""

from __future__ import annotations

import os
from pathlib import Path


def plot_ppo(records: list[dict], out: str | os.PathLike, sft_distinct_2: float | None = None) -> Path | None:
    """Per step and policy, from the run's metrics records: reward mean, KL, and distinct-2 (solid) with the
    repeated 4-gram rate (dashed) of the rollouts. With `sft_distinct_2` (the sft adapter's held-out
    distinct-2), a dotted line at half of it: a policy whose reward rises below that line is over-optimising."""
    rows = [r for r in records if r.get("stage") == "ppo" and "step" in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = sorted({k.split("/")[0] for r in rows for k in r if k.endswith("/reward/mean")})
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))

    def curve(ax, name, key, **kw):
        pts = [(r["step"], r[f"{name}/{key}"]) for r in rows if f"{name}/{key}" in r]
        if pts:
            return ax.plot(*zip(*pts), **kw)[0]
        return None

    for name in policies:
        curve(axes[0], name, "reward/mean", label=name)
        curve(axes[1], name, "kl/mean", label=name)
        line = curve(axes[2], name, "text/distinct_2", label=f"{name} distinct-2")
        if line is not None:
            curve(axes[2], name, "text/repeat_4", ls="--", color=line.get_color(), label=f"{name} repeated 4-grams")
    if sft_distinct_2 is not None:
        axes[2].axhline(sft_distinct_2 / 2, ls=":", color="gray", label="half the sft adapter's distinct-2")
    titles = ("reward (mean score per rollout)", "KL to reference (per sequence)",
              "text: distinct-2 (solid), repeated 4-grams (dashed)")
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("PPO step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)
    return out
