"""Row 11 (issue 20): a sweep is one run. Eight PPO configurations against the proxy reward adapter of row 10
(about 0.75 held-out accuracy), judged by the gold lexicon the policies never see, four ways:

    python -m bench.population [--quick] [--seeds 3] [--steps 50]
    python -m bench.run_all --only population        # the same, as a row of bench/RESULTS.md

- **A**: the shipped defaults: configs/ppo.yaml's first policy (learning rate 5e-4, kl_target 2, GAE), alone;
- **B**: the 8 configurations of `GRID` as one `marl ppo` run, a sweep with `schedule: halving` (every T/5
  iterations the best half goes on), ranked on held-out prompts by the proxy (`rank_by: reward_model`) with
  `max_kl` and the distinct-2 floor; its pick: population.json's `winner`;
- **C**: the same 8 configurations as 8 separate `marl ppo` runs; its pick: the best gold of the 8 (an oracle a
  user does not have), and the one the same ranking would pick (the proxy on the same ranking prompts, with
  `max_kl`, the distinct-2 floor and lost KL targets, marl.ppo.population.rank);
- **D**: the same population with `schedule: pbt`;
- **E**: B ranked by the gold lexicon instead of the proxy (`rank_by: gold`, a reward function with weight 0
  in the training reward): the case of a task with a verifier, and how much of B's pick is the proxy's.

Every run is `pipelines.ppo.run` on configs/ppo.yaml in a fresh child process (`--child JSON`, bench/common.py),
which reports its wall time, its peak RSS (VmHWM) and where the time went (model load, the run's own held-out
evaluations, PPO iterations, rankings). The seed is the run's (every policy's). Per seed, one
`evaluate_adapters` pass over the sft adapter and every picked policy on held-out prompts [0, GOLD_PROMPTS)
gives the gold reward (mean `marl.default.sentiment_score` of the completions) and the KL to the sft adapter;
the rankings use the held-out prompts after them, so the gold prompts never selected anything. Results are
kept per seed and arm in bench/.cache/population/ (--quick: a file of its own), so an interrupted run goes on
where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from bench.common import CACHE, Memory, Row, md_table, run_bench_child
from bench.gold import BASE, PROXY, ensure_proxy
from bench.runs import copy_adapters, ensure_adapters, ppo_config, ppo_records, stage_config
from marl.default import BUILDER_VERSION
from marl.stats import mean_se

ROOT = CACHE / "population" / BUILDER_VERSION  # the arms measured on one build of the default model (resumable)
# The 8 configurations: 5e-4 is configs/ppo.yaml's learning rate, 2e-3 four times it (the rate that hacked a
# real reward model in issue 20); kl_target 2 (the default) and 6 (configs/ppo.yaml's policy_b); PPO with the
# value head, and RLOO (critic-free, 4 answers per prompt). A's configuration is one of them.
GRID = {"learning_rate": [5e-4, 2e-3], "kl_target": [2.0, 6.0], "advantage_estimator": ["gae", "rloo"]}
# configs/sweep.yaml's schedule; `every` is T / 5 (10 at T = 50: 8 -> 4 -> 2 -> 1 policies under halving)
SCHEDULE = {"keep": 0.5, "pbt_quantile": 0.25, "rank_by": "reward_model", "max_kl": 8.0, "min_distinct_2": 0.8}
GOLD_PROMPTS = 32  # held-out prompts [0, 32): every run's own evaluation and the gold; the rankings: [32, 64)
FULL = {"steps": 50, "every": 10, "seeds": 3, "prompts": 32, "gold_samples": 4, "rank_prompts": 32, "run_eval_samples": 4,
        "gold_prompts": GOLD_PROMPTS}
QUICK = {"steps": 4, "every": 2, "seeds": 1, "prompts": 8, "gold_samples": 1, "rank_prompts": 8, "run_eval_samples": 1,
         "gold_prompts": 16}
ARMS = {"A": "shipped defaults, 1 policy", "B": "sweep, schedule: halving", "C": "8 separate runs",
        "D": "sweep, schedule: pbt", "E": "B ranked by the gold lexicon (rank_by a verifier)"}
SWEEPS = ("B", "D", "E")  # in the order the gold pass loads their picks
HALVING = ("B", "E")  # the sweeps under halving; D's is pbt
# E's ranking: the gold as a reward function that the training reward weighs 0 (the policies never train on it)
GOLD_RANKING = {"rank_by": "gold", "reward_functions": json.dumps({"gold": "marl.rewards:lexicon_sentiment"}),
                "reward_weights": json.dumps({"gold": 0.0})}


def configurations() -> dict[str, dict]:
    """The 8 configurations by the name the sweep gives each (e.g. `lr5e-4_kl2_gae`)."""
    from marl.sweep import expand_sweep, policy_name, sweep_values

    return {policy_name(c, sweep_values({"grid": GRID})): c for c in expand_sweep({"grid": GRID})}


# --------------------------------------------------------------------------- one run (a child process)


def arm_overrides(arm: str, p: dict, seed: int) -> tuple[list[dict], dict]:
    """(policies, overrides of configs/ppo.yaml) of arm A, B or D, or of C's configuration `arm` = C/<name>."""
    shared = {"total_steps": p["steps"], "seed": seed, "prompts_per_policy": p["prompts"],
              "mini_batch_size": min(p["prompts"], 16), "eval_prompts": p["gold_prompts"],
              "eval_samples_per_prompt": p["run_eval_samples"], "overwrite": "true"}
    if arm == "A":
        return [stage_config("ppo").policies[0]], shared
    if arm in SWEEPS:
        return [], {**shared, **SCHEDULE, "sweep": json.dumps({"grid": GRID}), "every": p["every"],
                    "rank_prompts": p["rank_prompts"], "schedule": "halving" if arm in HALVING else "pbt",
                    **(GOLD_RANKING if arm == "E" else {})}
    name = arm.split("/", 1)[1]
    return [{"name": name, **configurations()[name]}], shared


def child(_s, _a, config: dict) -> dict:
    """One `marl ppo` run: its wall time, peak RSS and where the time went."""
    import marl.stages.ppo as stage
    from marl.ppo.trainer import MultiPolicyPPOTrainer
    from marl.stages.population import Population

    mem = Memory()
    mem.reset()
    parts = {"load": 0.0, "run_eval": 0.0, "iterations": 0.0, "ranking": 0.0}
    count = {"policy_iterations": 0, "rankings": 0}

    def timed(owner, attr, part, counter=None):
        fn = getattr(owner, attr)

        def wrapper(*args, **kw):
            t = time.perf_counter()
            if counter == "policy_iterations":
                count[counter] += len(args[0].states)
            elif counter:
                count[counter] += 1
            try:
                return fn(*args, **kw)
            finally:
                parts[part] += time.perf_counter() - t

        setattr(owner, attr, wrapper)

    timed(stage, "_build", "load")
    timed(stage._Stage, "evaluate", "run_eval")
    timed(MultiPolicyPPOTrainer, "step", "iterations", "policy_iterations")
    timed(Population, "rank", "ranking", "rankings")
    cfg = ppo_config(Path(config["run_dir"]), config["policies"], **config["overrides"])
    t = time.perf_counter()
    res = stage.run(cfg)
    wall = time.perf_counter() - t
    return {"run_s": wall, "parts": parts, **count, "peak_mb": mem.peak_mb(), "baseline_mb": mem.baseline,
            "winner": res.get("population", {}).get("winner"), "stopped": res.get("population", {}).get("stopped")}


def run_arm(arm: str, p: dict, seed: int, proxy_dir: Path, root: Path) -> dict:
    """Arm `arm` of seed `seed` in a fresh child: a new run folder under `root` with the sft and proxy reward
    adapters."""
    from bench.common import settings

    run_dir = root / f"s{seed}" / arm.replace("/", "_")
    copy_adapters(BASE, run_dir, names=("sft",))
    copy_adapters(proxy_dir, run_dir, names=("reward",), fresh=False)
    policies, over = arm_overrides(arm, p, seed)
    t = time.perf_counter()
    r = run_bench_child("population", settings(True), f"population-s{seed}-{arm.replace('/', '_')}",
                        timeout=4 * 3600, run_dir=str(run_dir), policies=policies, overrides=over)
    r.update(wall_s=time.perf_counter() - t, run_dir=str(run_dir), overrides=over)
    if arm.startswith("C/"):
        r["lost"] = lost_targets(run_dir, policies[0]["name"], policies[0]["kl_target"])
    return r


def lost_targets(run_dir: Path, name: str, kl_target: float | None) -> bool:
    """Whether the run's KL controller lost its target (marl's warning, as the population ranks it out)."""
    from marl.ppo.kl import runaway_warning

    return any(runaway_warning(name, r[f"{name}/kl/mean"], r[f"{name}/kl/coef"], kl_target)
               for r in ppo_records(run_dir))


# --------------------------------------------------------------------------- gold and C's ranking (one seed)


def evaluate_seed(runs: dict, p: dict, seed: int, proxy_dir: Path) -> dict:
    """The gold pass (sft, A's policy, B's and D's winners and C's 8, on the gold prompts) and C's ranking pass
    (its 8 on the ranking prompts, as a population ranks them), in one process with one model."""
    from marl.default import sentiment_score
    from marl.evaluate import evaluate_adapters
    from marl.model import MultiAdapterModel
    from marl.ppo.population import rank
    from marl.stages.population import RANK_SAMPLES
    from marl.stages.common import set_threads
    from marl.stages.prompts import encode_prompt_rows, held_out_prompts

    cfg = stage_config("ppo", eval_prompts=p["gold_prompts"])
    set_threads(cfg)  # configs/ppo.yaml's torch_threads, as the runs had
    picked = {**({"A": runs["A"]["run_dir"] + "/adapters/policy_a"} if "A" in runs else {}),
              **{arm: f"{runs[arm]['run_dir']}/adapters/{runs[arm]['winner']}" for arm in SWEEPS if arm in runs},
              **{arm: f"{r['run_dir']}/adapters/{arm[2:]}" for arm, r in runs.items() if arm.startswith("C/")}}
    m = MultiAdapterModel.from_pretrained(cfg.model_name_or_path)
    m.load_adapter(str(proxy_dir / "adapters" / "reward"), "reward", role="reward")
    ref = m.load_adapter(str(BASE / "adapters" / "sft"), "sft", role="sft")
    labels = {"sft": ref} | {arm: m.load_adapter(folder, "p_" + arm.replace("/", "_"), role="policy")
                             for arm, folder in picked.items()}
    m.eval()
    held = held_out_prompts(cfg, m.tokenizer)
    gold_ids, _ = encode_prompt_rows(m, held[:p["gold_prompts"]], cfg, "gold")
    gold = evaluate_adapters(m, labels, gold_ids * p["gold_samples"], ref, cfg.max_new_tokens, cfg.temperature,
                             seed=seed, text_group=p["prompts"], extra_scores={"gold": sentiment_score})
    gold = {k: {x: v[x] for x in ("reward_mean", "gold_mean", "gold_std", "kl_mean", "distinct_2", "n")}
            for k, v in gold.items()}
    # C's pick, as the population picks: the proxy on the ranking prompts after the run's eval_prompts, at
    # the last iteration's seed, over max_kl, the floor of the sft adapter's distinct-2 and lost KL targets
    texts = held[p["gold_prompts"]: p["gold_prompts"] + p["rank_prompts"]]
    ids, kept = encode_prompt_rows(m, texts, cfg, "ranking")
    cs = {arm: labels[arm] for arm in runs if arm.startswith("C/")}
    if not cs:  # the sweeps' or A's arms alone (measure): no C ranking to make
        return {"gold": gold, "c_ranking": None}
    ev = evaluate_adapters(m, cs, ids * RANK_SAMPLES, ref, cfg.max_new_tokens, cfg.temperature,
                           seed=seed + p["steps"], n_samples=1, text_group=p["prompts"],
                           prompts=[texts[j] for j in kept] * RANK_SAMPLES)
    first_c = next(r for arm, r in runs.items() if arm.startswith("C/"))
    sft_d2 = json.loads((Path(first_c["run_dir"]) / "ppo_eval_before.json").read_text())["sft"]["distinct_2"]
    ranking = rank(ev, "reward_mean", SCHEDULE["max_kl"], SCHEDULE["min_distinct_2"] * sft_d2,
                   {arm for arm in cs if runs[arm]["lost"]})
    return {"gold": gold, "c_ranking": [{"name": s.name, "reward": s.metric, "kl": s.kl, "eligible": s.eligible,
                                         "reason": s.reason} for s in ranking]}


# --------------------------------------------------------------------------- measuring


def measure(p: dict, store_file: Path, fresh: bool = False) -> dict:
    """Every arm of every seed not in `store_file` yet, or measured with other settings (it is written after
    each), then each seed's evaluation: whole, or, when only A's or the sweeps' arms were measured again, of
    those arms alone (C's ranking stays); `fresh`: measure everything again."""
    store_file.parent.mkdir(parents=True, exist_ok=True)
    store = json.loads(store_file.read_text()) if store_file.exists() and not fresh else {}
    if store.get("params") != p:
        store = {"params": p, "seeds": {}}
    ensure_adapters(BASE, names=("sft",))
    proxy_dir, proxy = ensure_proxy(**PROXY)
    store["proxy_accuracy"] = proxy.get("eval_accuracy")
    arms = ["A", "B", "D", *[f"C/{n}" for n in configurations()], "E"]
    for seed in range(p["seeds"]):
        st = store["seeds"].setdefault(str(seed), {"runs": {}})
        for arm in arms:
            if st["runs"].get(arm, {}).get("overrides") != arm_overrides(arm, p, seed)[1]:
                if "eval" in st:  # its gold is measured again below; a new C arm changes C's ranking too
                    st["eval"]["gold"].pop(arm, None)
                    if arm.startswith("C/"):
                        del st["eval"]
                print(f"population: seed {seed}, arm {arm} ...", flush=True)
                st["runs"][arm] = run_arm(arm, p, seed, proxy_dir, store_file.with_suffix(""))
                print(f"population: seed {seed}, arm {arm}: {st['runs'][arm]['wall_s']:.0f} s, peak "
                      f"{st['runs'][arm]['peak_mb']:.0f} MB", flush=True)
                store_file.write_text(json.dumps(store, indent=1))
        missing = {a: r for a, r in st["runs"].items() if a not in st.get("eval", {}).get("gold", {})}
        if missing:
            t = time.perf_counter()
            if "eval" not in st:
                st["eval"] = evaluate_seed(st["runs"], p, seed, proxy_dir)
            else:
                gold = evaluate_seed(missing, p, seed, proxy_dir)["gold"]
                st["eval"]["gold"].update({a: gold[a] for a in missing})  # the sft adapter's gold stays
            st["eval_s"] = st.get("eval_s", 0.0) + time.perf_counter() - t
            store_file.write_text(json.dumps(store, indent=1))
    return store


# --------------------------------------------------------------------------- the numbers of the row


def arm_numbers(store: dict) -> dict:
    """Per arm (A, B, C oracle, C picked, D): mean ± SE over seeds of wall time, peak memory, gold and KL of its
    picked policy, with the names picked."""
    out = {}
    for key in ("A", "B", "C best gold (oracle)", "C picked by rank_by", "D", "E"):
        rows = []
        for st in store["seeds"].values():
            g, runs = st["eval"]["gold"], st["runs"]
            cs = {a: r for a, r in runs.items() if a.startswith("C/")}
            if key.startswith("C"):
                pick = max(cs, key=lambda a: g[a]["gold_mean"]) if "oracle" in key else \
                    st["eval"]["c_ranking"][0]["name"]
                wall = sum(r["wall_s"] for r in cs.values())
                peak = max(r["peak_mb"] for r in cs.values())
                above = max(r["peak_mb"] - r["baseline_mb"] for r in cs.values())
                name = pick[2:]
            else:
                pick, wall, peak, above = key, runs[key]["wall_s"], runs[key]["peak_mb"], \
                    runs[key]["peak_mb"] - runs[key]["baseline_mb"]
                name = runs[key]["winner"] or "policy_a"
            e, sft = g[pick], g["sft"]
            rows.append({"wall": wall, "peak": peak, "above": above, "gold": e["gold_mean"], "kl": e["kl_mean"],
                         "proxy": e["reward_mean"], "gain": (e["gold_mean"] - sft["gold_mean"]) / max(sft["gold_std"], 1e-8),
                         "name": name})
        out[key] = {k: mean_se([r[k] for r in rows]) for k in ("wall", "peak", "above", "gold", "kl", "proxy", "gain")}
        out[key]["names"] = [r["name"] for r in rows]
        out[key]["per_seed"] = rows
    return out


def ratio(num: dict, den: dict, key: str) -> tuple[float, float]:
    """Mean ± SE over seeds of the per-seed ratio num / den of `key`."""
    return mean_se([a[key] / b[key] for a, b in zip(num["per_seed"], den["per_seed"])])


def arm_parts(store: dict, arm: str) -> dict[str, float]:
    """Where arm `arm`'s wall time went (mean over seeds, seconds; C: its 8 runs together): process start and
    imports, model load, the run's own held-out evaluations, PPO iterations (and policy-iterations), rankings
    (and their count), the rest (writing)."""
    per = []
    for st in store["seeds"].values():
        rs = [r for a, r in st["runs"].items() if a == arm or (arm == "C" and a.startswith("C/"))]
        tot = {k: sum(r["parts"][k] for r in rs) for k in ("load", "run_eval", "iterations", "ranking")}
        tot["start"] = sum(r["wall_s"] - r["run_s"] for r in rs)
        tot["rest"] = sum(r["run_s"] for r in rs) - sum(tot[k] for k in ("load", "run_eval", "iterations",
                                                                           "ranking"))
        tot["wall"] = sum(r["wall_s"] for r in rs)
        tot["pi"] = sum(r["policy_iterations"] for r in rs)
        tot["rankings"] = sum(r["rankings"] for r in rs)
        per.append(tot)
    return {k: sum(t[k] for t in per) / len(per) for k in per[0]}


def parts_table(store: dict) -> str:
    """`arm_parts` of every arm."""
    rows = []
    for arm in ARMS:
        mean = arm_parts(store, arm)
        rows.append([f"{arm}: {ARMS[arm]}", mean["wall"], mean["start"], mean["load"], mean["run_eval"],
                     mean["iterations"], int(mean["pi"]), mean["iterations"] / max(mean["pi"], 1),
                     f"{mean['ranking']:.1f} ({int(mean['rankings'])})", mean["rest"]])
    return md_table(["arm", "wall s", "process start + imports", "model load", "run's own held-out evals",
                     "PPO iterations", "policy-iterations", "s per policy-iteration", "rankings s (count)",
                     "rest (writing)"], rows)


def fmt(ms: tuple[float, float], d: int = 3, unit: str = "") -> str:
    """'mean ± SE' (the mean alone for one seed)."""
    m, se = ms
    return f"{m:.{d}f}{unit} ± {se:.{d}f}" if se == se else f"{m:.{d}f}{unit}"


def estimate_full(store: dict, p: dict = FULL) -> float:
    """Seconds the full row would take on this machine, scaled from `store`'s measured parts: PPO iterations by
    policy-iterations and prompts per policy, rankings by their count and prompts, evaluations and the rest as
    measured (a rough figure: the full row's prompts make every pass longer)."""
    q = store["params"]
    scale_pi = p["prompts"] / q["prompts"]
    total = 0.0
    for st in store["seeds"].values():
        for arm, r in st["runs"].items():
            pi_full = {"A": p["steps"], "D": 8 * p["steps"]}.get(arm, p["steps"])
            if arm in HALVING:
                pi_full = halving_policy_iterations(8, p["steps"], p["every"], SCHEDULE["keep"])
            rankings_full = (p["steps"] - 1) // p["every"] + 1 if arm in SWEEPS else 0
            per_pi = r["parts"]["iterations"] / max(r["policy_iterations"], 1)
            per_rank = r["parts"]["ranking"] / max(r["rankings"], 1) * p["rank_prompts"] / q["rank_prompts"]
            evals = r["parts"]["run_eval"] * p["gold_prompts"] * p["run_eval_samples"] / (
                q["gold_prompts"] * q["run_eval_samples"])
            fixed = r["wall_s"] - sum(r["parts"].values())
            total += fixed + r["parts"]["load"] + evals + per_pi * scale_pi * pi_full + per_rank * rankings_full
        total += st.get("eval_s", 0.0) * p["gold_prompts"] * p["gold_samples"] / (q["gold_prompts"] * q["gold_samples"])
    return total / len(store["seeds"]) * p["seeds"]


def halving_policy_iterations(n: int, steps: int, every: int, keep: float) -> int:
    """Policy-iterations of a halving run: n policies until the first ranking, then ceil(keep * n) ..."""
    total, alive = 0, n
    for step in range(1, steps + 1):
        total += alive
        if step % every == 0 and step < steps:
            alive = max(1, math.ceil(keep * alive))
    return total


# --------------------------------------------------------------------------- the row


def build_row(store: dict, quick: bool) -> Row:
    p = store["params"]
    n = arm_numbers(store)
    a, b, c, d, e = n["A"], n["B"], n["C picked by rank_by"], n["D"], n["E"]
    sft_gold = mean_se([st["eval"]["gold"]["sft"]["gold_mean"] for st in store["seeds"].values()])
    rows = [["sft adapter (start, reference)", "-", "-", "-", "-", fmt(sft_gold), "0", "0", "-"]]
    for key, v in n.items():
        label = key if key[0] == "C" else f"{key}: {ARMS[key]}"
        rows.append([label, fmt(v["wall"], 0), fmt(v["above"], 0), fmt(v["peak"], 0), ", ".join(v["names"]),
                     fmt(v["gold"]), fmt(v["gain"], 2), fmt(v["kl"], 2), fmt(v["proxy"])])
    table = md_table(["arm", "wall time s", "peak MB above imports", "peak RSS MB", "picked policy (per seed)",
                      "gold reward", "gold gain, sft std", "KL to sft", "proxy reward"], rows)
    conf_rows = []
    for name in configurations():
        vals = [st["eval"]["gold"][f"C/{name}"] for st in store["seeds"].values()]
        conf_rows.append([name, fmt(mean_se([v["gold_mean"] for v in vals])), fmt(mean_se([v["kl_mean"] for v in vals]), 2),
                          fmt(mean_se([v["reward_mean"] for v in vals]))])
    conf = md_table(["C: separate run", "gold reward", "KL to sft", "proxy reward"], conf_rows)

    gold_diff = mean_se([x["gold"] - y["gold"] for x, y in zip(b["per_seed"], a["per_seed"])])
    kl_ok = all(x["kl"] <= SCHEDULE["max_kl"] for x in b["per_seed"])
    gold_ok = b["gold"][0] >= a["gold"][0] and kl_ok
    bc, ba, mem = ratio(b, n["C best gold (oracle)"], "wall"), ratio(b, a, "wall"), ratio(b, a, "above")
    time_ok, mem_ok = bc[0] <= 0.5 and ba[0] <= 4.0, mem[0] <= 1.5
    misses = []
    if not gold_ok:
        oracle = n["C best gold (oracle)"]["gold"][0]
        misses.append(f"B's pick: gold {b['gold'][0]:.3f} against A's {a['gold'][0]:.3f}" +
                      ("" if kl_ok else f", KL over max_kl {SCHEDULE['max_kl']:g} in a seed") +
                      f"; picking by the proxy costs gold: in C the proxy's pick has {c['gold'][0]:.3f}, the best "
                      f"of the 8 {oracle:.3f}")
    if not time_ok:
        pa, pb = arm_parts(store, "A"), arm_parts(store, "B")
        misses.append(f"B's wall time {ba[0]:.2f}x A's, {bc[0]:.2f}x C's: B spends {pb['iterations']:.0f} s in "
                      f"{pb['pi']:.0f} policy-iterations and {pb['ranking']:.0f} s in {pb['rankings']:.0f} rankings, "
                      f"A {pa['iterations']:.0f} s in {pa['pi']:.0f}; start, load and evaluations: B "
                      f"{pb['wall'] - pb['iterations'] - pb['ranking']:.0f} s, A {pa['wall'] - pa['iterations']:.0f} s")
    if not mem_ok:
        misses.append(f"B's peak above imports {mem[0]:.2f}x A's ({b['above'][0]:.0f} MB against "
                      f"{a['above'][0]:.0f}: {(b['above'][0] - a['above'][0]) / 7:.0f} MB per extra policy): 8 "
                      "policies' LoRA weights, gradients, Adam states and value heads, and 8x the rollout rows until "
                      "the first halving")
    result = (f"B's pick gold {fmt(b['gold'])} vs A's {fmt(a['gold'])} (B - A {fmt(gold_diff)}; KL "
              f"{fmt(b['kl'], 2)} <= max_kl {SCHEDULE['max_kl']:g}: {'yes' if kl_ok else 'no'}); C's best gold "
              f"{fmt(n['C best gold (oracle)']['gold'])}, C picked {fmt(c['gold'])}, D {fmt(d['gold'])}, "
              f"E (B ranked by the gold) {fmt(e['gold'])}; wall B/C "
              f"{fmt(bc, 2, 'x')}, B/A {fmt(ba, 2, 'x')}; peak memory B/A {fmt(mem, 2, 'x')}" + (f"; missed: {'; '.join(misses)}" if misses else ""))
    est = estimate_full(store)
    measures = (
        f"`python -m bench.population` (bench/population.py): the default task against the proxy reward adapter "
        f"of row 10 (held-out accuracy {store.get('proxy_accuracy') or float('nan'):.3f}), judged by the gold lexicon "
        f"(`marl.default.sentiment_score`) the policies never see; {p['steps']} iterations, {p['prompts']} prompts "
        f"per policy, seeds {list(range(p['seeds']))} (the run's seed), configs/ppo.yaml otherwise. The 8 configurations: "
        f"learning_rate {GRID['learning_rate']} x kl_target {GRID['kl_target']} x advantage_estimator "
        f"{GRID['advantage_estimator']} (RLOO: 4 answers per prompt); A's (5e-4, 2, gae) is one of them. B and D "
        f"rank every {p['every']} iterations on {p['rank_prompts']} held-out prompts x 2 by the proxy "
        f"(`rank_by: reward_model`), max_kl {SCHEDULE['max_kl']:g}, distinct-2 >= {SCHEDULE['min_distinct_2']}x the "
        f"sft adapter's (halving keeps {SCHEDULE['keep']}, pbt's quantile {SCHEDULE['pbt_quantile']}); E is B ranked "
        f"by the gold lexicon on the same ranking prompts (`rank_by: gold`, weight 0 in the training reward). Gold and KL "
        f"to the sft adapter: one evaluate_adapters pass per seed on the first {p['gold_prompts']} held-out prompts x "
        f"{p['gold_samples']} samples, which no ranking used. Wall time: the child process from start to exit "
        f"(C: the sum of its 8); memory: its peak RSS (VmHWM), and the peak above the RSS after importing the "
        f"libraries (C: the largest of its 8 runs, which run one after another). Mean ± standard error over seeds; "
        f"ratios are per-seed ratios. The full row takes about {est / 60:.0f} min on this machine (estimated from "
        f"this {'smoke test' if quick else 'run'}).")
    detail = "\n\n".join([table, "Where the time went (mean over seeds, s):", parts_table(store),
                          "C's 8 separate runs on the gold prompts:", conf])
    seconds = sum(r["wall_s"] for st in store["seeds"].values() for r in st["runs"].values()) + sum(
        st.get("eval_s", 0.0) for st in store["seeds"].values())
    return Row("population", measures, result, gold_ok and time_ok and mem_ok, detail=detail, raw={"population": store},
               seconds=seconds,
               notes=["The per-policy memory targets of issue 20 (each extra policy <= 5% of the one-policy peak with "
                      "adamw_8bit; 4 policies on a 4-bit base <= 0.6x full precision) are measured at the "
                      "Qwen2.5-0.5B shape by row 8."] + ([f"Smoke test ({p['steps']} iterations, {p['seeds']} seed, "
                                                          f"{p['prompts']} prompts): the numbers say nothing."]
                                                         if quick else []))


def run(s, _a=None) -> Row:
    """`bench.run_all --only population`: the row with its defaults (--quick: the smoke test)."""
    quick = getattr(s, "quick", False)
    p = QUICK if quick else FULL
    store = measure(p, ROOT / ("population-quick.json" if quick else "population.json"))
    return build_row(store, quick)


def main(argv: list[str] | None = None) -> int:
    from bench.common import child_main, render_row

    if child_main(child):
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"smoke test: {QUICK} (its own cache file)")
    ap.add_argument("--seeds", type=int, default=None, help=f"seeds (default {FULL['seeds']})")
    ap.add_argument("--steps", type=int, default=None, help=f"PPO iterations T of every run (default {FULL['steps']})")
    ap.add_argument("--prompts", type=int, default=None, help=f"prompts per policy (default {FULL['prompts']})")
    ap.add_argument("--fresh", action="store_true", help="measure every arm again (default: keep the arms and "
                    "seeds already measured with these settings, e.g. of an interrupted run)")
    args = ap.parse_args(argv)
    p = dict(QUICK if args.quick else FULL)
    p.update({k: v for k, v in (("seeds", args.seeds), ("steps", args.steps), ("prompts", args.prompts)) if v})
    if args.steps:
        p["every"] = max(1, args.steps // 5)
    default = p == (QUICK if args.quick else FULL)
    name = "population-quick" if args.quick else "population"
    if not default:
        name += f"-t{p['steps']}-s{p['seeds']}-p{p['prompts']}"
    store = measure(p, ROOT / f"{name}.json", args.fresh)
    row = build_row(store, args.quick)
    print(render_row(row))
    print(f"population: the full row (T={FULL['steps']}, {FULL['seeds']} seeds) would take about "
          f"{estimate_full(store) / 60:.0f} min on this machine", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
