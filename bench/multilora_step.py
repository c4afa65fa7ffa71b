"""Issue 7: a PPO step for 4 policies with the stacked multi-LoRA path against peft's path.

    python -m bench.multilora_step [--quick] [--steps 3] [--rounds 2]

Arms, each in its own process (so peak memory does not mix), same prompts, seeds and lengths:

- batched: `multi_lora: batched` (default): one generate call, stacked LoRA; updates in passes
  mixing all policies, at most one policy's micro-batch of rows per pass (`update_pass_rows: 0`);
- batched, whole minibatches: the same with every policy's minibatch in one pass
  (`update_pass_rows` = N x mini_batch_size): fewer, larger passes;
- peft mixed: `multi_lora: peft`: peft's mixed-adapter generate (`adapter_names=`), then one
  pass per policy for everything else;
- one pass per policy: peft, and one generate call per policy (`mixed_batch: false`).

Reports the median step time, its phases and the peak memory after loading. Writes
bench/RESULTS-multilora.md (not with --quick).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.common import Memory, assets_from_json, assets_to_json, ensure_assets, machine, marl_trainer, median, \
    ppo_args, settings, settings_from_json, settings_to_json

REPO = Path(__file__).resolve().parents[1]
N_POLICIES = 4


def arms(s) -> list[tuple[str, dict]]:
    return [
        ("batched (default: passes of one micro-batch)", {"multi_lora": "batched"}),
        ("batched, whole minibatches per pass", {"multi_lora": "batched",
                                                 "update_pass_rows": N_POLICIES * s.mini_batch_size}),
        ("peft mixed generate, then one pass per policy", {"multi_lora": "peft"}),
        ("one pass per policy (generate too)", {"multi_lora": "peft", "mixed_batch": False}),
    ]


def child(cfg: dict) -> dict:
    s, a = settings_from_json(cfg["settings"]), assets_from_json(cfg["assets"])
    model, trainer = marl_trainer(a, ppo_args(a, s, N_POLICIES, **cfg["overrides"]))
    trainer.step()  # warm-up
    mem = Memory()
    mem.reset()
    steps = [trainer.step() for _ in range(cfg["steps"])]
    out = {k: median([m[f"time/{k}"] for m in steps]) for k in ("step", "generate", "score", "reference", "update")}
    return {**out, "peak_mb": mem.peak_mb()}


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per arm and round (median)")
    ap.add_argument("--rounds", type=int, default=2, help="times each arm runs, alternating (median)")
    ap.add_argument("--child", default=None)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))))
        return
    s = settings(args.quick)
    a = ensure_assets(s)
    runs: dict[str, list[dict]] = {label: [] for label, _ in arms(s)}
    for rnd in range(args.rounds):  # arms alternate, so a slow spell of a shared machine hits all of them
        for label, overrides in arms(s):
            cfg = {"overrides": overrides, "steps": args.steps, "settings": settings_to_json(s),
                   "assets": assets_to_json(a)}
            out = subprocess.run([sys.executable, "-m", "bench.multilora_step", "--child", json.dumps(cfg)],
                                 cwd=REPO, capture_output=True, text=True, check=True).stdout
            runs[label].append(json.loads(next(x for x in out.splitlines() if x.startswith("RESULT "))[7:]))
            print(f"round {rnd + 1}, {label}: {runs[label][-1]}", file=sys.stderr)
    res = [(label, {k: median([r[k] for r in rs]) for k in rs[0]}) for label, rs in runs.items()]
    base = res[0][1]
    m = machine()
    where = f"{m['gpu']}" if m["gpu"] != "none" else f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}"
    lines = [
        f"Model: {s.describe_model()}, {a.n_params / 1e6:.0f}M parameters; {N_POLICIES} policies x "
        f"{s.prompts_per_policy} prompts, {s.max_new_tokens} new tokens, mini_batch_size {s.mini_batch_size}, "
        f"{s.ppo_epochs} PPO epochs; median of {args.steps} steps after a warm-up, median over {args.rounds} "
        f"alternating rounds (a fresh process each); {where}.", "",
        "| path | step (s) | generate (s) | score + reference (s) | update (s) | peak memory (MB) | "
        "step time / batched | peak memory / batched |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, r in res:
        lines.append(f"| {label} | {r['step']:.2f} | {r['generate']:.2f} | {r['score'] + r['reference']:.2f} | "
                     f"{r['update']:.2f} | {r['peak_mb']:.0f} | {r['step'] / base['step']:.2f}x | "
                     f"{r['peak_mb'] / base['peak_mb']:.2f}x |")
    lines += ["", "Target (issue 7): a PPO step for 4 policies >= 1.5x faster batched than with one pass per "
              "policy; no more peak memory than the per-policy path."]
    table = "\n".join(lines)
    print(table)
    if not args.quick:
        (REPO / "bench" / "RESULTS-multilora.md").write_text(
            "# Batched multi-LoRA PPO step\n\n`python -m bench.multilora_step`\n\n" + table + "\n")


if __name__ == "__main__":
    main()
