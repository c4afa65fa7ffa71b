"""Row 9: the critic-free estimators against PPO at equal samples, on the default task: final held-out
reward and KL over seeds, and the wall time of each estimator's training.

    python -m bench.estimators [--quick]
    python -m bench.run_all --only estimators --out bench/RESULTS-estimators.md

1. A reward adapter is trained once (`pipelines.reward.run` on configs/reward.yaml, as row 6).
2. One `marl ppo` run per estimator (configs/ppo.yaml settings, no sft adapter: the reference is the bare
   base, as row 6), its seeds side by side on one base. Each estimator has its own run so that its wall
   time is its own (`make compare` trains PPO, GRPO and RLOO side by side in one run instead).
   - PPO: GAE with a critic adapter started from the reward adapter (`value_model: adapter`,
     `critic_init: reward`), the best PPO arm of row 6;
   - GRPO, RLOO, REINFORCE++: no value model; the same KL in the reward as PPO (kl_coef, k1), so only
     the advantage estimator differs; GRPO also with its own KL, beta * k3 in the loss (`kl_in: loss`).
   Equal samples: every policy answers prompts_per_policy prompts per iteration (the group estimators:
   prompts_per_policy / num_generations prompts, num_generations answers each), for the same iterations,
   PPO epochs and minibatches.
3. One evaluation of all adapters together (`marl.evaluate.evaluate_adapters`, the held-out prompts, one
   sampling seed): mean reward and KL per adapter; per estimator the mean over seeds and its standard error.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from bench.common import (
    CACHE,
    REPO,
    Assets,
    BenchError,
    Row,
    Settings,
    main,
    md_table,
    run_bench_child,
    settings_from_json,
    settings_to_json,
)
from bench.learning import _ensure_reward, _mean_se, _model, _prompts

TITLE = "9. Learning: critic-free estimators (GRPO, RLOO, REINFORCE++) against PPO at equal samples"
TARGET = "GRPO and RLOO reach PPO's final reward: difference of means > -2 standard errors"
ARMS = {  # arm -> (label, marl ppo overrides)
    "ppo": ("PPO, critic adapter from the reward adapter (value_model: adapter, critic_init: reward)",
            {"value_model": "adapter", "critic_init": "reward"}),
    "grpo": ("GRPO, KL in the reward", {"advantage_estimator": "grpo"}),
    "grpo_kl_loss": ("GRPO, beta * k3 KL in the loss (kl_in: loss, beta 0.04)",
                     {"advantage_estimator": "grpo", "kl_in": "loss", "beta": "0.04"}),
    "rloo": ("RLOO, KL in the reward", {"advantage_estimator": "rloo"}),
    "reinforce_pp": ("REINFORCE++, KL in the reward", {"advantage_estimator": "reinforce_pp"}),
}


def _ppo_cfg(s: Settings, model: str, run_dir: Path, arm: str):
    from marl.config import PPOArgs, load_config

    over = {"run_dir": str(run_dir), "model_name_or_path": model, "sft_adapter": "none", "reward_adapter": "auto",
            "report_to": "none", "overwrite": "true", "log_samples": "0", "save_steps": "1000",
            "total_steps": str(s.learning_steps), **ARMS[arm][1]}
    if s.quick:
        over.update(prompts_per_policy="8", mini_batch_size="8", max_new_tokens="8", ppo_epochs="1",
                    eval_prompts="16", num_generations="2")
    cfg = load_config(PPOArgs, str(REPO / "configs" / "ppo.yaml"), [f"--{k}={v}" for k, v in over.items()])
    cfg.policies = [{"name": f"{arm}_s{seed}", "seed": seed} for seed in s.learning_seeds]
    return cfg


def child(config: dict) -> dict:
    s, arm, run_dir, model = settings_from_json(config["settings"]), config["arm"], Path(config["run_dir"]), config["model"]
    if arm in ARMS:
        from pipelines import ppo

        cfg = _ppo_cfg(s, model, run_dir, arm)
        results = ppo.run(cfg)
        return {"train_seconds": results["train_seconds"], "samples": cfg.prompts_per_policy * cfg.total_steps}
    # arm == "eval": every adapter of every arm in one evaluation
    from marl.evaluate import evaluate_adapters
    from marl.model import MultiAdapterModel

    cfg = _ppo_cfg(s, model, run_dir, "ppo")
    m = MultiAdapterModel.from_pretrained(model)
    m.load_adapter(str(run_dir / "adapters" / "reward"), "reward", role="reward")
    labels: dict[str, str | None] = {"base": None}
    for a in ARMS:
        for seed in s.learning_seeds:
            labels[f"{a}_s{seed}"] = m.load_adapter(str(run_dir / "adapters" / f"{a}_s{seed}"), role="policy")
    m.eval()
    res = evaluate_adapters(m, labels, _prompts(m, cfg)[1], None, cfg.max_new_tokens, cfg.temperature, seed=cfg.seed)
    return {k: {"reward": v["reward_mean"], "kl": v["kl_mean"], "n": v["n"]} for k, v in res.items()}


def run(s: Settings, a: Assets) -> Row:
    """Row 9: GRPO, RLOO and REINFORCE++ against PPO (critic adapter), seeds side by side."""
    t0 = time.perf_counter()
    budget = s.learning_budget_min * 60
    model = _model(s, a)
    run_dir = CACHE / "estimators" / ("quick" if s.quick else "default")
    _ensure_reward(s, model, run_dir)
    out = {}
    for arm in (*ARMS, "eval"):
        left = budget - (time.perf_counter() - t0)
        if left <= 0:
            return Row("estimators", TITLE, "", TARGET, f"not finished within its budget of "
                       f"{s.learning_budget_min:g} min (stopped before {arm})", None, seconds=time.perf_counter() - t0)
        s_arm = settings_from_json({**settings_to_json(s), "child_timeout_s": int(left)})
        try:
            out[arm] = run_bench_child("estimators", {"settings": settings_to_json(s), "arm": arm,
                                                      "run_dir": str(run_dir), "model": model}, s_arm,
                                       f"estimators-{arm}")
        except BenchError as e:
            return Row("estimators", TITLE, "", TARGET, f"not measured: {e}", None, seconds=time.perf_counter() - t0)
    ev, seeds = out["eval"], s.learning_seeds
    stats, rows = {}, []
    for arm, (label, _) in ARMS.items():
        r = [ev[f"{arm}_s{x}"]["reward"] for x in seeds]
        k = [ev[f"{arm}_s{x}"]["kl"] for x in seeds]
        stats[arm] = {"reward": _mean_se(r), "kl": _mean_se(k), "train_seconds": out[arm]["train_seconds"]}
        rows.append([label, *[f"{x:.3f}" for x in r], *stats[arm]["reward"], *[f"{x:.3f}" for x in k],
                     *stats[arm]["kl"], out[arm]["train_seconds"]])
    names = [f"seed {x}" for x in seeds]
    detail = md_table(["estimator", *[f"reward, {x}" for x in names], "reward mean", "reward SE",
                       *[f"KL, {x}" for x in names], "KL mean", "KL SE", "training wall seconds"], rows)
    detail += (f"\n\nThe base model before training: reward {ev['base']['reward']:.3f} ({ev['base']['n']} held-out "
               f"answers). Every policy saw {out['ppo']['samples']} sampled answers.")

    def versus_ppo(arm: str, metric: str = "reward") -> tuple[float, float]:
        (m1, se1), (m0, se0) = stats[arm][metric], stats["ppo"][metric]
        return m1 - m0, math.sqrt(se1 ** 2 + se0 ** 2)

    diffs = {arm: versus_ppo(arm) for arm in ARMS if arm != "ppo"}
    decidable = all(se == se for _, se in diffs.values())
    meets = bool(all(d > -2 * se for arm, (d, se) in diffs.items() if arm in ("grpo", "rloo"))) if decidable else None
    notes = [f"{ARMS[arm][0]} - PPO: reward {d:+.3f} (two standard errors {2 * se:.3f}), KL "
             f"{versus_ppo(arm, 'kl')[0]:+.3f} ({2 * versus_ppo(arm, 'kl')[1]:.3f})." for arm, (d, se) in diffs.items()]
    notes += [
        "Training wall seconds: `marl ppo`'s training loop for the estimator's seeds side by side (generation, "
        "scoring, reference and old passes, updates), without its held-out evaluations. PPO's includes its critic "
        "adapter's passes and updates; the critic-free estimators have none.",
        "Per-seed rewards are means over the held-out answers; standard errors are over seeds, so they hold the "
        "seed-to-seed and the evaluation noise together.",
        f"Budget {s.learning_budget_min:g} min; this row took {(time.perf_counter() - t0) / 60:.1f} min.",
    ]
    result = "; ".join(f"{arm} - PPO = {d:+.3f} (2 SE {2 * se:.3f})" for arm, (d, se) in diffs.items())
    return Row("estimators", TITLE, (
        f"{s.learning_steps} iterations per estimator and seed ({len(seeds)} seeds side by side in one `marl ppo` "
        "run per estimator; configs/ppo.yaml's shared settings, so the KL controller at kl_target 2, no sft "
        "adapter), then one held-out "
        "evaluation of all adapters together: mean reward-adapter score and mean KL to the reference."),
        TARGET, f"final reward: {result}", meets, detail, notes, raw={"eval": ev, "stats": stats, "runs": out},
        seconds=time.perf_counter() - t0)


if __name__ == "__main__":
    main(run, child)
