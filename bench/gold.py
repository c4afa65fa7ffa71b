"""Gold-reward row (Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization"): PPO policies trained
against an imperfect *proxy* reward adapter, judged by a *gold* reward they never see.

    python -m bench.gold [--steps 50] [--prompts 8] [--seeds 3] [--only proxy,arms,check]
    python -m bench.run_all --only gold        # the same, as a row of bench/RESULTS.md

1. `pipelines.sft.run` / `pipelines.reward.run` (configs/*.yaml) train the sft adapter and the normal reward
   adapter of the default task once (bench/.cache/gold/<builder version>/base).
2. Proxy: `pipelines.reward.run` on few preference pairs of the default corpus with some labels swapped
   (bench/.cache/gold/<builder version>/proxy_.../data: train.jsonl noised, test.jsonl the clean held-out pairs), so that its
   held-out accuracy is about 0.75 (reported).
3. Arms: `pipelines.ppo.run` on configs/ppo.yaml against the proxy; every arm that differs from the others only
   in per-policy settings is a policy of ONE run (x seeds, the seed is per policy); `value_model: adapter` +
   `critic_init: reward` is a second run.
4. Gold: `marl.default.sentiment_score` of each response (the corpus's scripted lexicon, which wrote the
   preference labels), never seen in training. One `marl.evaluate.evaluate_adapters` pass over the sft adapter
   and every policy on the held-out prompts: proxy score, gold score, KL to the sft adapter, distinct-2.
5. Check: the shipped configs/ppo.yaml (its policies x seeds) against the normal reward adapter.

Writes bench/RESULTS-gold.md and bench/gold.png (gold and proxy reward against KL).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from bench.common import CACHE, REPO, Row, md_table
from bench.runs import copy_adapters, ensure_adapters, ppo_config, ppo_records, second_half, stage_config
from marl.default import BUILDER_VERSION
from marl.stats import mean_se

ROOT = CACHE / "gold"
ADAPTERS = ROOT / BUILDER_VERSION  # adapters are trained on one build of the default model: a new build, new ones
BASE = ADAPTERS / "base"  # the sft and normal reward adapters of the default task (bench/kl_control.py's too)
# arm -> (what it is, per-policy overrides); "critic" is a run of its own (value_model is run-wide)
ARMS = {
    "old": ("old KL defaults: kl_coef 0.05 fixed, reward_norm none", {"kl_coef": 0.05, "kl_target": None}),
    "fixed": ("fixed kl_coef 0.2", {"kl_coef": 0.2, "kl_target": None}),
    "target2": ("kl_target 2 (adaptive, from kl_coef 0.05)", {"kl_target": 2.0}),
    "target6": ("kl_target 6 (adaptive, from kl_coef 0.05)", {"kl_target": 6.0}),
    "batch": ("reward_norm batch, kl_coef 0.05 fixed", {"reward_norm": "batch", "kl_target": None}),
    "running": ("reward_norm running, kl_coef 0.05 fixed", {"reward_norm": "running", "kl_target": None}),
    "target2_running": ("kl_target 2 + reward_norm running", {"kl_target": 2.0, "reward_norm": "running"}),
    "target6_running": ("kl_target 6 + reward_norm running", {"kl_target": 6.0, "reward_norm": "running"}),
    "critic": ("value_model adapter + critic_init reward (old defaults otherwise)", {"kl_target": None}),
}
RUN_WIDE = {"critic": {"value_model": "adapter", "critic_init": "reward"}}
PROXY = {"pairs": 96, "noise": 0.35, "seed": 0, "epochs": 6}  # chosen so that the held-out accuracy is about 0.75


# --------------------------------------------------------------------------- adapters


def proxy_data(folder: Path, pairs: int, noise: float, seed: int) -> Path:
    """train.jsonl: `pairs` preference pairs of the default corpus, a `noise` fraction with chosen and rejected
    swapped; test.jsonl: the clean held-out pairs."""
    from marl.default import ensure_default_data

    data = ensure_default_data()
    rows = [json.loads(x) for x in (data / "reward_train.jsonl").read_text().splitlines() if x.strip()]
    rng = random.Random(seed)
    rows = rng.sample(rows, pairs)
    for r in rng.sample(rows, round(noise * pairs)):
        r["chosen"], r["rejected"] = r["rejected"], r["chosen"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "test.jsonl").write_text((data / "reward_test.jsonl").read_text())
    return folder


def ensure_proxy(pairs: int, noise: float, seed: int, epochs: int) -> tuple[Path, dict]:
    """The proxy reward adapter (pipelines.reward.run on the noised pairs) and its held-out results."""
    from pipelines import reward

    run_dir = ADAPTERS / f"proxy_p{pairs}_n{noise:g}_s{seed}_e{epochs}"
    data = proxy_data(run_dir / "data", pairs, noise, seed)
    res_file = run_dir / "proxy.json"
    if not (run_dir / "adapters" / "reward" / "adapter_config.json").exists() or not res_file.exists():
        # few pairs: several epochs at a small batch, so the adapter fits them (and their noise)
        res = reward.run(stage_config("reward", run_dir=run_dir, dataset_name=data, overwrite="true",
                                      per_device_train_batch_size=8, num_train_epochs=epochs, seed=seed))
        res_file.write_text(json.dumps(res))
    return run_dir, json.loads(res_file.read_text())


# --------------------------------------------------------------------------- PPO runs


def train_arms(reward_dir: Path, arms: list[str], seeds: list[int], steps: int, prompts: int) -> dict[str, Path]:
    """One `marl ppo` run per run-wide setting; returns policy name -> its adapter folder."""
    from pipelines import ppo

    groups: dict[str, list[str]] = {}
    for arm in arms:
        groups.setdefault(arm if arm in RUN_WIDE else "shared", []).append(arm)
    out = {}
    for group, members in groups.items():
        run_dir = reward_dir / f"ppo_{group}"
        copy_adapters(BASE, run_dir, names=("sft",))
        copy_adapters(reward_dir, run_dir, names=("reward",), fresh=False)
        policies = [{"name": f"{arm}_s{seed}", "seed": seed, **ARMS[arm][1]} for arm in members for seed in seeds]
        t0 = time.perf_counter()
        ppo.run(ppo_config(run_dir, policies, overwrite="true", total_steps=steps, prompts_per_policy=prompts,
                           mini_batch_size=min(prompts, 16), eval_prompts=16, eval_samples_per_prompt=1,
                           **RUN_WIDE.get(group, {})))
        print(f"gold: {group} run ({len(policies)} policies, {steps} iterations) took "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        out.update({p["name"]: run_dir / "adapters" / p["name"] for p in policies})
    return out


def evaluate(reward_dir: Path, adapters: dict[str, Path], prompts: int, samples: int, group: int) -> dict:
    """Proxy score (the run's reward adapter), gold score, KL to sft, text statistics of the sft adapter and
    every policy, in one `evaluate_adapters` pass on the held-out prompts."""
    from marl.data import load_split, prompt_texts
    from marl.default import sentiment_score
    from marl.evaluate import evaluate_adapters
    from marl.model import MultiAdapterModel
    from marl.stages.prompts import encode_prompts

    cfg = stage_config("ppo")
    m = MultiAdapterModel.from_pretrained(cfg.model_name_or_path)
    m.load_adapter(str(reward_dir / "adapters" / "reward"), "reward", role="reward")
    ref = m.load_adapter(str(BASE / "adapters" / "sft"), "sft", role="sft")
    labels = {"sft": ref}
    for name, folder in adapters.items():
        labels[name] = m.load_adapter(str(folder), name, role="policy")
    m.eval()
    held = prompt_texts(load_split(cfg.dataset_name, cfg.eval_split, "ppo", cfg.dataset_config), m.tokenizer)
    ids = encode_prompts(m, held[:prompts], cfg, "held-out") * samples
    res = evaluate_adapters(m, labels, ids, ref, cfg.max_new_tokens, cfg.temperature, seed=cfg.seed,
                            text_group=group, extra_scores={"gold": sentiment_score})
    return {k: {x: v[x] for x in ("reward_mean", "reward_std", "gold_mean", "gold_std", "kl_mean", "distinct_2",
                                  "repeat_4", "length_mean", "n")} | {"samples": v["samples"][:2]}
            for k, v in res.items()}


def train_kl(run_dir: Path, names: list[str]) -> dict[str, float]:
    """Each policy's mean rollout KL over the second half of its run (what kl_target holds)."""
    recs = ppo_records(run_dir)
    return {n: second_half(recs, n) for n in names}


# --------------------------------------------------------------------------- tables


def seed_stats(ev: dict, kl2: dict, names: list[str], target: float | None) -> dict:
    """Mean ± standard error over the seeds (policies `names`) of each held-out figure and of the training KL;
    distinct-2 and the gold gain (in sft standard deviations) against the sft adapter's; whether it kept its KL
    target: the held-out and the training (second half) KL inside [0.5 T, 1.5 T]."""
    sft = ev["sft"]
    st = {k: mean_se([ev[n][k] for n in names]) for k in ("reward_mean", "gold_mean", "kl_mean", "distinct_2",
                                                           "repeat_4")}
    st["train_kl"] = mean_se([kl2[n] for n in names])
    st["d2_ratio"] = st["distinct_2"][0] / max(sft["distinct_2"], 1e-8)
    st["target"] = target
    st["in_band"] = None if target is None else all(0.5 * target <= st[k][0] <= 1.5 * target
                                                    for k in ("kl_mean", "train_kl"))
    st["gold_gain_sft_std"] = (st["gold_mean"][0] - sft["gold_mean"]) / max(sft["gold_std"], 1e-8)
    return st


def arm_stats(ev: dict, kl2: dict, arms: list[str], seeds: list[int]) -> dict:
    return {arm: seed_stats(ev, kl2, [f"{arm}_s{s}" for s in seeds], ARMS[arm][1].get("kl_target")) for arm in arms}


def check_stats(c: dict) -> list[dict]:
    """Per shipped policy of the check: its `seed_stats` and whether it meets the issue's bar (gold gain >= 1 sft
    standard deviation, KL in its band, distinct-2 >= 0.8x the sft adapter's)."""
    out = []
    run_wide = c["kl_target"] if "kl_target" in c else stage_config("ppo").kl_target  # measured before it was kept
    for p in c["policies"]:
        target = p.get("kl_target", run_wide)
        st = {"policy": p, "kl_target": target,
              **seed_stats(c["eval"], c["train_kl"], [f"{p['name']}_s{s}" for s in c["seeds"]], target)}
        st["ok"] = (st["gold_gain_sft_std"] >= 1.0 and st["in_band"] is not False
                    and st["distinct_2"][0] >= 0.8 * c["eval"]["sft"]["distinct_2"])
        out.append(st)
    return out


def fmt(ms: tuple[float, float], d: int = 3) -> str:
    m, se = ms
    return f"{m:.{d}f} ± {se:.{d}f}"


def band(st: dict) -> str:
    return "-" if st["in_band"] is None else ("yes" if st["in_band"] else "no")


def table(stats: dict, sft: dict) -> str:
    rows = [["sft adapter (start, reference)", f"{sft['reward_mean']:.3f}", f"{sft['gold_mean']:.3f} "
             f"(std {sft['gold_std']:.3f})", "0", "-", f"{sft['distinct_2']:.3f}", "1.00", f"{sft['repeat_4']:.3f}",
             "-"]]
    for arm, st in stats.items():
        rows.append([ARMS[arm][0], fmt(st["reward_mean"]), fmt(st["gold_mean"]), fmt(st["kl_mean"], 2),
                     fmt(st["train_kl"], 2), fmt(st["distinct_2"]), f"{st['d2_ratio']:.2f}", fmt(st["repeat_4"]),
                     band(st)])
    return md_table(["arm", "proxy reward (held-out)", "gold reward (held-out)", "KL to sft (held-out)",
                     "KL, training 2nd half", "distinct-2", "distinct-2 / sft's", "repeated 4-grams",
                     "inside [0.5T, 1.5T]"], rows)


def choose(stats: dict, kl_bound: float) -> str | None:
    """The arm with the best final gold reward that keeps its KL target (arms without one: held-out KL under
    kl_bound) and distinct-2 >= 0.8x the sft adapter's."""
    ok = [a for a, st in stats.items() if st["d2_ratio"] >= 0.8 and
          (st["in_band"] if st["in_band"] is not None else st["kl_mean"][0] <= kl_bound)]
    return max(ok, key=lambda a: stats[a]["gold_mean"][0]) if ok else None


def plot(ev: dict, arms: list[str], seeds: list[int], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, key, what in zip(axes, ("gold_mean", "reward_mean"), ("gold reward (lexicon, never trained on)",
                                                                  "proxy reward (the adapter trained against)")):
        ax.scatter([0], [ev["sft"][key]], marker="*", s=160, color="black", label="sft adapter")
        for arm in arms:
            pts = [(ev[f"{arm}_s{s}"]["kl_mean"], ev[f"{arm}_s{s}"][key]) for s in seeds]
            ax.scatter(*zip(*pts), label=arm, alpha=0.8)
        ax.set_xlabel("KL to the sft adapter (held-out, per sequence)")
        ax.set_title(what)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize="small", loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- the row


def measure(steps: int, prompts: int, seeds: list[int], eval_prompts: int, eval_samples: int,
            only: list[str], out_md: Path, out_png: Path, result_file: Path = ROOT / "gold.json") -> dict:
    """Measure the parts in `only`, keep the others from `result_file`, write it and render the row."""
    t0 = time.perf_counter()
    store = json.loads(result_file.read_text()) if result_file.exists() else {}
    ensure_adapters(BASE)
    if "proxy" in only or "arms" in only:
        proxy_dir, proxy = ensure_proxy(**PROXY)
        store["proxy"] = {"dir": str(proxy_dir), **PROXY, **proxy}
        print(f"gold: proxy reward adapter, held-out accuracy {proxy.get('eval_accuracy')}", flush=True)
    if "arms" in only:
        proxy_dir = Path(store["proxy"]["dir"])
        adapters = train_arms(proxy_dir, list(ARMS), seeds, steps, prompts)
        ev = evaluate(proxy_dir, adapters, eval_prompts, eval_samples, prompts)
        kl2 = {}
        for group in ("shared", *RUN_WIDE):
            kl2.update(train_kl(proxy_dir / f"ppo_{group}", [n for n in adapters if (n.rsplit("_s", 1)[0] in RUN_WIDE)
                                                            == (group != "shared")]))
        store["arms"] = {"eval": ev, "train_kl": kl2, "steps": steps, "prompts": prompts, "seeds": seeds,
                         "eval_prompts": eval_prompts, "eval_samples": eval_samples}
    if "check" in only:
        store["check"] = check_defaults(seeds, eval_prompts, eval_samples)
    store.setdefault("seconds", {})["+".join(only)] = time.perf_counter() - t0  # what measuring each part took
    result_file.write_text(json.dumps(store, indent=1))
    render(store, out_md, out_png)
    print(f"gold: {time.perf_counter() - t0:.0f} s; wrote {out_md} and {out_png}", flush=True)
    return store


def check_defaults(seeds: list[int], eval_prompts: int, eval_samples: int) -> dict:
    """The shipped configs/ppo.yaml (each of its policies x seeds) on the default task with the normal reward."""
    from pipelines import ppo

    shipped = stage_config("ppo").policies
    run_dir = ROOT / "check"
    copy_adapters(BASE, run_dir)
    policies = [{**p, "name": f"{p['name']}_s{s}", "seed": s} for p in shipped for s in seeds]
    cfg = ppo_config(run_dir, policies, overwrite="true", eval_prompts=16, eval_samples_per_prompt=1)
    t0 = time.perf_counter()
    ppo.run(cfg)
    seconds = time.perf_counter() - t0
    ev = evaluate(run_dir, {p["name"]: run_dir / "adapters" / p["name"] for p in policies}, eval_prompts,
                  eval_samples, cfg.prompts_per_policy)
    kl2 = train_kl(run_dir, [p["name"] for p in policies])
    return {"eval": ev, "train_kl": kl2, "policies": shipped, "seeds": seeds, "seconds": seconds,
            "steps": cfg.total_steps, "prompts": cfg.prompts_per_policy, "kl_target": cfg.kl_target}


def render(store: dict, out_md: Path, out_png: Path) -> None:
    lines = ["# Gold-reward row (issue 11, item 5)", "",
             "Written by `python -m bench.gold` (or `python -m bench.run_all --only gold`); numbers from "
             "bench/.cache/gold/gold.json.", ""]
    if "proxy" in store:
        p = store["proxy"]
        lines += [f"**Proxy reward adapter**: `marl reward` (configs/reward.yaml, {p['epochs']} epochs, batch 8) on {p['pairs']} "
                  f"preference pairs of the default corpus with {p['noise']:.0%} of them swapped: held-out accuracy "
                  f"**{p.get('eval_accuracy', float('nan')):.3f}** on the 400 clean held-out pairs (margin "
                  f"{p.get('eval_margin', float('nan')):.2f}). The normal reward adapter (2000 clean pairs) reaches "
                  "0.99.", "",
                  "**Gold reward**: `marl.default.sentiment_score` of the response (the scripted lexicon that wrote "
                  "the corpus's preference labels; in [-1, 1]); the policies never see it.", ""]
    if "arms" in store:
        a = store["arms"]
        arms = [k for k in ARMS if f"{k}_s{a['seeds'][0]}" in a["eval"]]
        stats = arm_stats(a["eval"], a["train_kl"], arms, a["seeds"])
        best = choose(stats, kl_bound=12.0)
        lines += [f"## Arms against the proxy ({a['steps']} iterations, {a['prompts']} prompts per policy, seeds "
                  f"{a['seeds']}; held-out: {a['eval_prompts']} prompts x {a['eval_samples']} samples)", "",
                  "mean ± standard error over seeds. The arms that differ only in per-policy settings were policies "
                  "side by side in one `marl ppo` run; the critic arm (value_model is run-wide) a second run. "
                  "Everything else is configs/ppo.yaml's (value head with value_loss_norm: true).", "",
                  *([a["note"], ""] if a.get("note") else []),
                  table(stats, a["eval"]["sft"]), "",
                  f"Best final gold reward with its KL target kept (arms without a target: held-out KL <= 12, the "
                  f"config's kl_bound) and distinct-2 >= 0.8x the sft adapter's: **{best}** "
                  f"({ARMS[best][0] if best else '-'}).", "", *defaults_lines(stats),
                  "![gold and proxy reward against KL](gold.png)", ""]
        plot(a["eval"], arms, a["seeds"], out_png, f"policies against a proxy reward adapter (accuracy "
             f"{store.get('proxy', {}).get('eval_accuracy', float('nan')):.2f}): gold and proxy reward vs KL")
    if "check" in store:
        c = store["check"]
        sft = c["eval"]["sft"]
        checked = check_stats(c)
        ok_all = all(st["ok"] for st in checked)
        rows = [[json.dumps(st["policy"]), fmt(st["gold_mean"]), f"{st['gold_gain_sft_std']:+.2f}", fmt(st["kl_mean"], 2),
                 fmt(st["train_kl"], 2), band(st), fmt(st["distinct_2"]), f"{st['d2_ratio']:.2f}",
                 "yes" if st["ok"] else "no"] for st in checked]
        shipped = stage_config("ppo")
        targets = [q.get("kl_target", shipped.kl_target) for q in shipped.policies]
        lines += [f"## Check: the policies of configs/ppo.yaml with the normal reward adapter ({c['steps']} "
                  f"iterations, {c['prompts']} prompts per policy, seeds {c['seeds']}, {c['seconds']:.0f} s for the "
                  "run)", "",
                  f"The shipped configs/ppo.yaml trains kl_target {' and '.join(f'{t:g}' for t in targets)}; the check "
                  "ran the policies below, side by side.", "",
                  f"sft adapter: gold {sft['gold_mean']:.3f} (std {sft['gold_std']:.3f}), distinct-2 "
                  f"{sft['distinct_2']:.3f}.", "",
                  md_table(["policy (configs/ppo.yaml)", "gold reward", "gain in sft std", "KL held-out",
                            "KL training 2nd half", "inside [0.5T, 1.5T]", "distinct-2", "/ sft's",
                            "gold >= sft + 1 std, KL in band, distinct-2 >= 0.8x"], rows), "",
                  f"All policies meet it: **{'yes' if ok_all else 'no'}**.", ""]
    lines += kl_control_lines()
    out_md.write_text("\n".join(lines) + "\n")


def defaults_lines(stats: dict) -> list[str]:
    """The sentence on marl ppo's shipped defaults and why (they were chosen from this table)."""
    if not all(a in stats for a in ("old", "target2", "critic", "running", "batch")):
        return []
    g = {a: st["gold_mean"] for a, st in stats.items()}
    tied = [a for a in stats if g[a][0] >= max(x[0] for x in g.values()) - max(g[a][1], 1e-9)]
    return [f"**marl ppo's defaults** (PPOArgs, configs/ppo.yaml): `kl_target: 2`, `reward_norm: none`, "
            f"`value_model: head`. The best gold rewards are tied within a standard error "
            f"({', '.join(f'{a} {g[a][0]:.3f}' for a in tied)}); of those, kl_target 2 got there at the least KL "
            f"({stats['target2']['kl_mean'][0]:.2f} against {stats['old']['kl_mean'][0]:.2f} for a fixed 0.05), "
            "with distinct-2 at the sft adapter's, and it holds its KL whatever the reward's scale, where a fixed "
            "coefficient lets a larger reward_scale drag the policy off. Normalising the reward (batch "
            f"{g['batch'][0]:.3f}, running {g['running'][0]:.3f}) did not raise the gold reward; the critic adapter "
            f"started from the reward adapter reached the highest proxy reward "
            f"({stats['critic']['reward_mean'][0]:.2f}) with distinct-2 at {stats['critic']['d2_ratio']:.2f}x the "
            "sft adapter's and no better a gold reward: it over-optimises the proxy. The check below runs the "
            "shipped policies (kl_target 2 and 6) with the normal reward adapter.", ""]


def kl_control_lines(folders=(CACHE / "kl_control" / "steps500", CACHE / "kl_control_vnorm_off" / "steps500",
                              CACHE / "kl_control_t1_critic500" / "steps500")) -> list[str]:
    """The tables of `python -m bench.kl_control` (does kl_target hold?), for the runs that have been made."""
    runs = [json.loads((f / "kl_control.json").read_text()) for f in folders if (f / "kl_control.json").exists()]
    if not runs:
        return []
    rows = []
    for d in runs:
        for p in d["policies"].values():
            kls = p["kl_second_half"]
            rows.append([f"{p['target']:g}", d["args"].get("extra") or "configs/ppo.yaml (value head, value_loss_norm: true)",
                         f"[{0.5 * p['target']:g}, {1.5 * p['target']:g}]",
                         *[f"{kls[n]:.2f}" if n in kls else "-" for n in ("50", "100", "200", "500")],
                         "yes" if p["inside"] else "**no**", f"{p['beta_final']:.3g}"])
    a = runs[0]["args"]
    return [f"## Does kl_target hold? (`python -m bench.kl_control`: {a['steps']} iterations, {a['prompts']} prompts "
            "per policy, configs/ppo.yaml otherwise)", "",
            "The policies of each target side by side in one run, the normal reward adapter. Nothing in marl's PPO "
            "depends on total_steps, so the first N iterations of a run are an N-iteration run: each column is "
            "the mean per-sequence KL of the rollouts over the second half of a run of that length. Holding "
            "kl_target 1 takes kl_coef past 1; without value_loss_norm the penalties then swamp the value loss of "
            "the value head on the policy's own LoRA, its gradient moves the policy off and the target is lost "
            "(marl warns when kl_coef sits at its cap of 10 with the KL above 1.5x the target). Dividing the value "
            "loss by the returns' variance (value_loss_norm: true, the default) or a separate critic "
            "(value_model: adapter) holds it.", "",
            md_table(["kl_target", "run", "band", *[f"KL, 2nd half of {n} it." for n in (50, 100, 200, 500)],
                      "all inside", "final kl_coef"], rows), ""]


def run(s, a) -> Row:
    """`bench.run_all --only gold`: the whole row with its defaults (or a smoke test with --quick)."""
    quick = getattr(s, "quick", False)
    seeds = [0, 1] if quick else [0, 1, 2]
    md, png = (CACHE / "RESULTS-gold-quick.md", CACHE / "gold-quick.png") if quick else \
        (REPO / "bench" / "RESULTS-gold.md", REPO / "bench" / "gold.png")
    steps, prompts, eval_prompts, eval_samples = (2, 8, 8, 1) if quick else (50, 16, 64, 2)
    cached = json.loads((ROOT / "gold.json").read_text()) if (ROOT / "gold.json").exists() else {}
    arms = cached.get("arms", {})
    if not quick and "check" in cached and (arms.get("steps"), arms.get("prompts"), arms.get("seeds")) == (
            steps, prompts, seeds):  # `python -m bench.gold` measured this row with these settings: render it
        render(cached, md, png)
        store = cached
    else:
        store = measure(steps, prompts, seeds, eval_prompts, eval_samples, ["proxy", "arms", "check"], md, png,
                        CACHE / "gold-quick.json" if quick else ROOT / "gold.json")  # a smoke test keeps the row's
    a_ = store["arms"]
    stats = arm_stats(a_["eval"], a_["train_kl"], list(ARMS), a_["seeds"])
    best = choose(stats, kl_bound=12.0)
    checked = check_stats(store["check"]) if "check" in store else []
    gains = ", ".join(f"kl_target {st['kl_target']:g}: {st['gold_gain_sft_std']:+.2f}" for st in checked)
    shipped = "the shipped kl_target 2" if best == "target2" else \
        f"kl_target 2 tied ({stats['target2']['gold_mean'][0]:.3f}) at {stats['target2']['kl_mean'][0]:.1f} KL"
    return Row("gold", "PPO arms against a proxy reward adapter of about 0.75 accuracy, judged by a gold lexicon "
               "reward (bench/gold.py; full tables in bench/RESULTS-gold.md)",
               f"proxy accuracy {store['proxy'].get('eval_accuracy', float('nan')):.3f}; best gold among the arms: "
               f"{best} ({stats[best]['gold_mean'][0]:.3f} at {stats[best]['kl_mean'][0]:.1f} KL), {shipped}; the "
               f"shipped defaults' gold gain in sft std: {gains}",
               bool(checked) and all(st["ok"] for st in checked), detail=md.read_text(), raw={"gold": store},
               seconds=sum(store.get("seconds", {}).values()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50, help="PPO iterations of each arm")
    ap.add_argument("--prompts", type=int, default=16, help="prompts per policy per iteration")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--eval-prompts", type=int, default=64)
    ap.add_argument("--eval-samples", type=int, default=2, help="samples per held-out prompt")
    ap.add_argument("--only", default="proxy,arms,check", help="stages: proxy, arms, check (others kept)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    measure(args.steps, args.prompts, list(range(args.seeds)), args.eval_prompts, args.eval_samples,
            args.only.split(","), REPO / "bench" / "RESULTS-gold.md", REPO / "bench" / "gold.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
