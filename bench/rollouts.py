"""Row 3: N policies generating in one mixed-adapter batch against N sequential generate
calls with adapter switches (`marl.ppo.rollout.generate_rollout`, mixed_batch True / False).

One process, one model with N policy LoRAs; every variant generates from the same prompt
batch with the same seed, and the variants are timed alternately.
"""

from __future__ import annotations

import torch

from bench.common import (
    Assets, Row, Settings, fx, interleaved, load_base, main, md_table, median, randomize_lora_b, run_bench_child,
    sample_prompt_batch,
)


def child(s: Settings, a: Assets, config: dict) -> dict:
    """Every variant's generate times, tokens and longest response, in this (fresh) process."""
    from marl.config import PPOArgs
    from marl.ppo.rollout import generate_rollout

    n = s.rollout_policies
    model = load_base(a)
    lora = PPOArgs(lora_r=s.lora_r, lora_alpha=s.lora_alpha).lora_config(dropout=0.0)
    names = [f"policy_{i}" for i in range(n)]
    for i, name in enumerate(names):
        torch.manual_seed(i)
        model.add_adapter(name, lora, role="policy")
    randomize_lora_b(model, names)
    model.eval()
    ids, mask = sample_prompt_batch(a, model, n, s.prompts_per_policy)
    rows = [name for name in names for _ in range(s.prompts_per_policy)]
    temps = torch.ones(len(rows))
    tokens: dict[str, int] = {}
    longest: dict[str, int] = {}

    def variant(key, adapter_names, mixed, multi_lora="batched"):
        def go():
            model.multi_lora = multi_lora  # marl's default "batched" (stacked LoRA) or peft's adapter_names path
            torch.manual_seed(0)
            ro = generate_rollout(model, ids, mask, adapter_names, temps, s.max_new_tokens, mixed_batch=mixed)
            tokens[key] = int(ro.response_mask.sum())
            longest[key] = int(ro.response_mask.sum(1).max())
        return go

    fns = {
        "mixed": variant("mixed", rows, True),
        "mixed_peft": variant("mixed_peft", rows, True, "peft"),
        "sequential": variant("sequential", rows, False),
        "single": variant("single", [names[0]] * len(rows), True),
        "disabled": variant("disabled", [None] * len(rows), True),
    }
    times = interleaved(fns, s.repeats)
    return {"times": times, "tokens": tokens, "longest": longest, "rows": len(rows)}


def run(s: Settings, a: Assets) -> Row:
    """Row 3: one mixed-adapter generate call vs N sequential calls."""
    r = run_bench_child("rollouts", s, "rollouts", a)
    t, n = {k: median(v) for k, v in r["times"].items()}, s.rollout_policies
    labels = {
        "sequential": f"{n} sequential calls, one adapter each ({s.prompts_per_policy} rows)",
        "mixed": f"**one mixed-adapter call, marl's default** (`multi_lora=batched`: stacked LoRA, {r['rows']} rows)",
        "mixed_peft": f"one mixed-adapter call through peft (`multi_lora=peft`: `adapter_names=`, {r['rows']} rows)",
        "single": f"one call, one adapter for all {r['rows']} rows (the bound for a multi-LoRA kernel)",
        "disabled": f"one call, adapters disabled ({r['rows']} rows)",
    }
    rows = [[labels[k], t[k], t["sequential"] / t[k], r["tokens"][k], r["longest"][k]] for k in labels]
    detail = md_table(["generate", "seconds (median)", "speedup vs sequential", "tokens generated", "longest response"],
                      rows)
    speedup = t["sequential"] / t["mixed"]
    target_x = 2.0 if not torch.cuda.is_available() else 0.6 * n
    notes = [
        f"marl's mixed call costs {t['mixed'] / t['single']:.2f}x a single-adapter call over the same rows (the "
        f"bound for any multi-LoRA path); peft's own mixed path costs {t['mixed_peft'] / t['single']:.2f}x (it runs "
        "each adapter's LoRA on its own sub-batch, per layer, per token; docs/known-issues.md #4).",
        "Every variant draws with torch seed 0 from the same prompts. Rows stop at EOS, so the tokens kept differ "
        "a little between variants, but each call decodes until its longest row ends ('longest response', "
        f"at most {s.max_new_tokens}): the work per call is the same.",
    ]
    return Row("rollouts", (
        f"Wall time of `generate_rollout` for {n} policies x {s.prompts_per_policy} prompts, {s.max_new_tokens} new "
        f"tokens (sampling), in one process, {s.repeats} interleaved repeats after a warm-up, median. The speedup "
        "compared with the target is marl's default mixed call against the sequential calls."),
        fx(speedup), bool(speedup >= target_x), detail, notes, raw=r)


if __name__ == "__main__":
    main(run, child)
