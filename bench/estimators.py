"""Row 9: the critic-free estimators against PPO at equal samples, on the default task: final held-out
reward and KL over seeds, and the wall time of each estimator's training.

    python -m bench.run_all --only estimators --out bench/RESULTS-estimators.md

As row 6 (bench/learning.py: the reward adapter trained once, no sft adapter, one held-out evaluation of
all adapters together, means over seeds with standard errors), with one `marl ppo` run per estimator
(configs/ppo.yaml settings), its seeds side by side on one base, so that its wall time is its own (`make
compare` trains PPO, GRPO and RLOO side by side in one run instead).
- PPO: GAE with a critic adapter started from the reward adapter (`value_model: adapter`, `critic_init:
  reward`), the best PPO arm of row 6;
- GRPO, RLOO, REINFORCE++: no value model; the same KL in the reward as PPO (kl_coef, k1), so only the
  advantage estimator differs; GRPO also with its own KL, beta * k3 in the loss (`kl_in: loss`).
Equal samples: every policy answers prompts_per_policy prompts per iteration (the group estimators:
prompts_per_policy / num_generations prompts, num_generations answers each), for the same iterations, PPO
epochs and minibatches.
"""

from __future__ import annotations

import time
from pathlib import Path

from bench.common import Assets, Row, Settings, main
from bench.learning import evaluate, measure_arms, ppo_cfg, seed_table
from marl.stats import difference

ARMS = {  # arm -> (label, marl ppo overrides)
    "ppo": ("PPO, critic adapter from the reward adapter (value_model: adapter, critic_init: reward)",
            {"value_model": "adapter", "critic_init": "reward"}),
    "grpo": ("GRPO, KL in the reward", {"advantage_estimator": "grpo"}),
    "grpo_kl_loss": ("GRPO, beta * k3 KL in the loss (kl_in: loss, beta 0.04)",
                     {"advantage_estimator": "grpo", "kl_in": "loss", "beta": "0.04", "kl_target": "null"}),
    "rloo": ("RLOO, KL in the reward", {"advantage_estimator": "rloo"}),
    "reinforce_pp": ("REINFORCE++, KL in the reward", {"advantage_estimator": "reinforce_pp"}),
}


def child(s: Settings, a: Assets | None, config: dict) -> dict:
    arm, run_dir, model = config["arm"], Path(config["run_dir"]), config["model"]
    if arm in ARMS:
        from pipelines import ppo

        cfg = ppo_cfg(s, model, run_dir, arm, **ARMS[arm][1], **(dict(num_generations=2) if s.quick else {}))
        results = ppo.run(cfg)
        return {"train_seconds": results["train_seconds"], "samples": cfg.prompts_per_policy * cfg.total_steps}
    return evaluate(s, model, run_dir, {f"{a}_s{seed}": run_dir / "adapters" / f"{a}_s{seed}" for a in ARMS
                                        for seed in s.learning_seeds})


def run(s: Settings, a: Assets) -> Row:
    """Row 9: GRPO, RLOO and REINFORCE++ against PPO (critic adapter), seeds side by side."""
    t0 = time.perf_counter()
    out, failed = measure_arms("estimators", s, a, ARMS, t0)
    if failed:
        return failed
    ev, seeds = out["eval"], s.learning_seeds
    detail, stats = seed_table(ev, {arm: label for arm, (label, _) in ARMS.items()}, seeds,
                               {arm: out[arm]["train_seconds"] for arm in ARMS}, "estimator", "training wall seconds")
    detail += (f"\n\nThe base model before training: reward {ev['base']['reward']:.3f} ({ev['base']['n']} held-out "
               f"answers). Every policy saw {out['ppo']['samples']} sampled answers.")

    def versus_ppo(arm: str, metric: str = "reward") -> tuple[float, float]:
        return difference(stats[arm][metric], stats["ppo"][metric])

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
    return Row("estimators", (
        f"{s.learning_steps} iterations per estimator and seed ({len(seeds)} seeds side by side in one `marl ppo` "
        "run per estimator; configs/ppo.yaml's shared settings, so the KL controller at kl_target 2, no sft "
        "adapter), then one held-out "
        "evaluation of all adapters together: mean reward-adapter score and mean KL to the reference."),
        f"final reward: {result}", meets, detail, notes, raw={"eval": ev, "stats": stats, "runs": out},
        seconds=time.perf_counter() - t0)


if __name__ == "__main__":
    main(run, child)
