"""Does `kl_target` hold? Policies with kl_target 1, 4 and 8 side by side in ONE `marl ppo` run on the
default task (the sft adapter as reference and start, the normal reward adapter); per policy the mean
per-sequence KL of the rollouts over the second half of the run against the band [0.5 T, 1.5 T].

    python -m bench.kl_control [--steps 500] [--lengths 50,100,200,500] [--prompts 32] [--targets 1,4,8]

Nothing in marl's PPO depends on total_steps (no learning-rate schedule; the controller sees one
iteration at a time), so the first N iterations of one long run ARE an N-iteration run: one run of
`--steps` iterations gives the second-half KL of every run length in `--lengths`. The defaults are those
of configs/ppo.yaml (32 prompts per policy, mini-batches of 16); the controller is marl/ppo/kl.py's.

Uses `pipelines.sft.run` / `pipelines.reward.run` (once, cached) and `pipelines.ppo.run` on
configs/ppo.yaml with `--key value` overrides, as a user would; reads the run's metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bench.common import CACHE
from bench.gold import BASE
from bench.runs import copy_adapters, ensure_adapters, ppo_config, ppo_records, second_half


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--lengths", default="50,100,200,500", help="run lengths to report (<= --steps)")
    ap.add_argument("--prompts", type=int, default=32, help="prompts per policy per iteration")
    ap.add_argument("--targets", default="1,4,8")
    ap.add_argument("--out", default=str(CACHE / "kl_control"))
    ap.add_argument("--extra", default="", help="more overrides, e.g. 'kl_horizon=5,learning_rate=1e-3'")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from pipelines import ppo

    run_dir = Path(args.out) / f"steps{args.steps}"
    copy_adapters(ensure_adapters(BASE), run_dir)
    targets = [float(t) for t in args.targets.split(",")]
    over = {"total_steps": args.steps, "prompts_per_policy": args.prompts, "mini_batch_size": min(args.prompts, 16),
            "eval_prompts": 16, "eval_samples_per_prompt": 1}
    over.update(kv.split("=", 1) for kv in args.extra.split(",") if kv)
    ppo.run(ppo_config(run_dir, [{"name": f"policy_t{t:g}", "kl_target": t} for t in targets], **over))
    recs = ppo_records(run_dir)
    lengths = [n for n in (int(x) for x in args.lengths.split(",")) if n <= len(recs)]
    out = {}
    print("| kl_target | band | " + " | ".join(f"KL, 2nd half of {n} it." for n in lengths)
          + " | all inside | final beta |")
    print("| ---: | --- | " + " | ".join("---:" for _ in lengths) + " | --- | ---: |")
    for t in targets:
        name = f"policy_t{t:g}"
        kls = {n: second_half(recs[:n], name) for n in lengths}
        ok = all(0.5 * t <= kl <= 1.5 * t for kl in kls.values())
        out[name] = {"target": t, "kl_second_half": kls, "inside": ok, "beta_final": recs[-1][f"{name}/kl/coef"],
                     "reward_second_half": {n: second_half(recs[:n], name, "reward/mean") for n in lengths},
                     "kl_curve": [r[f"{name}/kl/mean"] for r in recs], "beta_curve": [r[f"{name}/kl/coef"] for r in recs]}
        print(f"| {t:g} | [{0.5 * t:g}, {1.5 * t:g}] | " + " | ".join(f"{kls[n]:.2f}" for n in lengths)
              + f" | {'yes' if ok else 'NO'} | {out[name]['beta_final']:.4f} |")
    (run_dir / "kl_control.json").write_text(json.dumps({"args": vars(args), "policies": out}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
