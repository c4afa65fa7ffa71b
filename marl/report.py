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
    return _save(fig, out)


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """The names whose (reward, kl) no other point beats on both: higher reward and lower KL (ties count)."""
    front = []
    for name, (r, k) in points.items():
        if not any((r2 >= r and k2 <= k) and (r2 > r or k2 < k) for n2, (r2, k2) in points.items() if n2 != name):
            front.append(name)
    return front


def population_markdown(pop: dict) -> str:
    """population.md: the final ranking of a sweep (held-out reward, the rank metric, KL, distinct-2, settings,
    status and lineage of every policy), then each ranking step of the schedule."""
    grace = f" from iteration {pop['grace']}" if pop.get("grace") else ""
    head = (f"# Population: {len(pop['policies'])} policies, schedule `{pop['schedule']}` every {pop['every']} "
            f"iterations{grace}, ranked by `{pop['rank_by']}` on held-out prompts")
    limits = [f"max_kl {pop['max_kl']:g}" if pop.get("max_kl") is not None else "no max_kl",
              f"distinct-2 floor {pop['min_distinct_2']:.3f}" if pop.get("min_distinct_2") is not None else
              "no distinct-2 floor"]
    lines = [head, "", f"Winner: **{pop['winner']}**. Limits: {', '.join(limits)}; a policy outside them, or whose KL "
             "controller lost its target, ranks below every policy inside.", "",
             "| rank | policy | status | reward | rank metric | KL | distinct-2 | ranked out | settings | lineage |",
             "| ---: | --- | --- | ---: | ---: | ---: | ---: | --- | --- | --- |"]
    for i, s in enumerate(pop["ranking"], 1):
        p = pop["policies"][s["name"]]
        settings = ", ".join(f"{k} {v}" for k, v in p["settings"].items())
        lineage = "; ".join(f"step {e['step']}: copied {e['from']}" for e in p.get("lineage", [])) or "-"
        d2 = "-" if s["distinct_2"] is None else f"{s['distinct_2']:.3f}"
        lines.append(f"| {i} | {s['name']} | {p['status']} | {s['reward']:.3f} | {s['metric']:.3f} | {s['kl']:.2f} | "
                     f"{d2} | {s['reason'] or '-'} | {settings} | {lineage} |")
    if pop.get("rankings"):
        lines += ["", "Rankings (best first) and what the schedule did:", ""]
    for r in pop.get("rankings", []):
        early = r["step"] < pop.get("grace", 0)
        acted = "; ".join(r.get("actions", [])) or ("none, before grace" if early else "none")
        lines.append(f"- step {r['step']}: {' > '.join(s['name'] for s in r['standings'])} (acted: {acted})")
    return "\n".join(lines) + "\n"


def plot_population(pop: dict, out: str | os.PathLike) -> Path:
    """population.png: reward against KL of every policy at its last evaluation (the Pareto front ringed,
    max_kl dashed), and the rank metric of every policy at each ranking step, with PBT's copies drawn as
    arrows from the source to the policy that took its weights and halving's stops as crosses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(14, 5))
    last = {s["name"]: s for s in pop["ranking"]}
    points = {n: (s["reward"], s["kl"]) for n, s in last.items()}
    front = set(pareto_front(points))
    for n, (r, k) in points.items():
        eligible = last[n]["eligible"]
        ax.scatter(k, r, marker="o" if eligible else "x", s=40, color="C0" if eligible else "C3")
        if n in front:
            ax.scatter(k, r, s=160, facecolors="none", edgecolors="k")
        ax.annotate(n, (k, r), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if pop.get("max_kl") is not None:
        ax.axvline(pop["max_kl"], ls="--", color="gray", label=f"max_kl {pop['max_kl']:g}")
        ax.legend(fontsize="small")
    ax.set(title="held-out reward against KL (ringed: Pareto front; x: ranked out)", xlabel="KL to reference",
           ylabel="reward")
    history: dict[str, list[tuple[int, float]]] = {}
    for r in pop.get("rankings", []):
        for s in r["standings"]:
            history.setdefault(s["name"], []).append((r["step"], s["metric"]))
    for n, pts in history.items():
        bx.plot(*zip(*pts), marker=".", label=n)
        if pop["policies"][n]["status"] == "stopped":
            bx.scatter(*pts[-1], marker="x", color="k")
    for n, p in pop["policies"].items():
        for e in p.get("lineage", []):
            src = dict(history.get(e["from"], [])).get(e["step"])
            dst = dict(history.get(n, [])).get(e["step"])
            if src is not None and dst is not None:
                bx.annotate("", xy=(e["step"], dst), xytext=(e["step"], src),
                            arrowprops={"arrowstyle": "->", "color": "gray", "alpha": 0.6})
    bx.set(title=f"rank metric ({pop['rank_by']}) at each ranking step", xlabel="PPO step")
    bx.legend(fontsize="x-small", ncol=2)
    for a in (ax, bx):
        a.grid(alpha=0.3)
    return _save(fig, out)


def _save(fig, out: str | os.PathLike) -> Path:
    """Write a figure to `out` through a temp file and one rename, and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)
    return out
