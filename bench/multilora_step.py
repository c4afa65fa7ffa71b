"""Issue 7: a PPO step for 4 policies with the stacked multi-LoRA path (`multi_lora: batched`,
one pass over the base for all policies) against peft's path (one pass per policy).

    python -m bench.multilora_step [--quick] [--steps 3]

Each mode runs in its own process (so peak memory does not mix) on the bench model, same
prompts, seeds and lengths; it reports the median step time, the update phase alone, and
peak memory after loading. Writes bench/RESULTS-multilora.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.common import Memory, assets_from_json, assets_to_json, ensure_assets, marl_trainer, median, ppo_args, \
    settings, settings_from_json, settings_to_json

REPO = Path(__file__).resolve().parents[1]


def child(cfg: dict) -> dict:
    s, a = settings_from_json(cfg["settings"]), assets_from_json(cfg["assets"])
    model, trainer = marl_trainer(a, ppo_args(a, s, 4, multi_lora=cfg["mode"]))
    trainer.step()  # warm-up
    mem = Memory()
    mem.reset()
    steps = [trainer.step() for _ in range(cfg["steps"])]
    return {"step_s": median([m["time/step"] for m in steps]), "update_s": median([m["time/update"] for m in steps]),
            "generate_s": median([m["time/generate"] for m in steps]), "peak_mb": mem.peak_mb()}


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--child", default=None)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))))
        return
    s = settings(args.quick)
    a = ensure_assets(s)
    res = {}
    for mode in ("batched", "peft"):
        cfg = {"mode": mode, "steps": args.steps, "settings": settings_to_json(s), "assets": assets_to_json(a)}
        out = subprocess.run([sys.executable, "-m", "bench.multilora_step", "--child", json.dumps(cfg)], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout
        res[mode] = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    b, p = res["batched"], res["peft"]
    table = "\n".join([
        f"Model: {s.describe_model()}; 4 policies x {s.prompts_per_policy} prompts, {s.max_new_tokens} new tokens, "
        f"{s.ppo_epochs} PPO epochs; median of {args.steps} steps after a warm-up.", "",
        "| path | step (s) | update phase (s) | generate (s) | peak memory (MB) |", "| --- | ---: | ---: | ---: | ---: |",
        f"| batched (one pass for all policies) | {b['step_s']:.2f} | {b['update_s']:.2f} | {b['generate_s']:.2f} | "
        f"{b['peak_mb']:.0f} |",
        f"| peft (one pass per policy) | {p['step_s']:.2f} | {p['update_s']:.2f} | {p['generate_s']:.2f} | "
        f"{p['peak_mb']:.0f} |",
        f"| ratio peft / batched | {p['step_s'] / b['step_s']:.2f}x | {p['update_s'] / b['update_s']:.2f}x | "
        f"{p['generate_s'] / b['generate_s']:.2f}x | memory batched / peft {b['peak_mb'] / p['peak_mb']:.2f}x |",
        "", "Target (issue 7): PPO step for 4 policies >= 1.5x faster batched; no more peak memory than peft's path.",
    ])
    print(table)
    if not args.quick:
        (REPO / "bench" / "RESULTS-multilora.md").write_text("# Batched multi-LoRA PPO step\n\n"
                                                              "`python -m bench.multilora_step`\n\n" + table + "\n")


if __name__ == "__main__":
    main()
