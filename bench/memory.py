"""Row 1: peak memory of PPO with N policies on one shared base, against the base alone
generating the same rollout batch and against separate full model copies per role.

Each configuration runs in a fresh child process: load, reset the peak, then
`memory_steps` PPO steps (the second step holds the optimizer state), read the peak.
"""

from __future__ import annotations

import time

import psutil
import torch

from bench.common import (
    NAN,
    Assets,
    Memory,
    Row,
    Settings,
    above,
    device_kwargs,
    fx,
    load_base,
    main,
    marl_trainer,
    md_table,
    ppo_args,
    run_children,
    sample_prompt_batch,
    weights_mb,
)

KINDS = {
    "base": "base alone, generating the rollout batch",
    "marl": "marl: one base, N policy LoRAs + value heads, reward LoRA",
    "separate": "separate copies (LoRA): 2N+2 full models",
    "separate_full": "separate copies, full fine-tuning: 2N+2 full models",
}


def child(s: Settings, a: Assets, config: dict) -> dict:
    """One configuration in this (fresh) process; returns its memory figures in MB."""
    from bench.separate import SeparateCopiesPPO
    from marl.ppo.rollout import generate_rollout

    kind, n = config["kind"], config["n"]
    mem = Memory()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    cfg = ppo_args(a, s, n)
    if kind == "base":
        model = load_base(a).eval()
        ids, mask = sample_prompt_batch(a, model, n, s.prompts_per_policy)
        temps = torch.ones(len(ids))

        def work():
            generate_rollout(model, ids, mask, [None] * len(ids), temps, s.max_new_tokens)
    elif kind == "marl":
        model, trainer = marl_trainer(a, cfg)
        work = trainer.step
    else:
        specs = cfg.resolved_policies()
        sep = SeparateCopiesPPO(a.base, a.reward, cfg, specs, a.prompt_ids(),
                                train="full" if kind == "separate_full" else "lora", load_kwargs=device_kwargs())
        model = sep.ref
        work = sep.step
    load_peak = mem.peak_mb()
    mem.reset()
    after_load = mem.current_mb()
    for _ in range(s.memory_steps):
        work()
    return {"kind": kind, "n": n, "baseline_mb": mem.baseline, "load_peak_mb": load_peak, "after_load_mb": after_load,
            "peak_mb": mem.peak_mb(), "weight_mb": weights_mb(model), "peak_includes_load": not mem.resettable,
            "metric": mem.kind,
            "seconds": time.perf_counter() - t0}


def _fits(kind: str, n: int, a: Assets) -> bool:
    """Skip a configuration whose weights + optimizer alone would not fit in free memory."""
    w = a.n_params * 4 / 2**20
    need = {"base": w, "marl": w, "separate": (2 * n + 2) * w, "separate_full": (2 * n + 2) * w + 2 * n * 3 * w}[kind]
    free = (torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else psutil.virtual_memory().available) / 2**20
    return need * 1.5 < free


def run(s: Settings, a: Assets) -> Row:
    """Row 1: memory with N policies on one base vs the base alone vs separate copies."""
    configs, notes = {}, []
    for n in s.memory_ns:
        for kind in KINDS:
            if kind == "separate_full" and n not in s.full_finetune_ns:
                continue
            if _fits(kind, n, a):
                configs[f"{kind}-{n}"] = {"kind": kind, "n": n}
            else:
                notes.append(f"{kind} N={n} skipped: its weights and optimizer state would not fit in free memory")
    results = run_children("memory", s, a, configs, notes)

    def peak(kind, n, raw=False):  # above the child's own interpreter + libraries, or its raw peak RSS
        r = results.get(f"{kind}-{n}")
        return (r["peak_mb"] if r else NAN) if raw else above(r)

    rows, raw_rows = [], []
    for n in s.memory_ns:
        b, m, sep, full = (peak(kind, n) for kind in KINDS)
        rows.append([n, b, m, m / b, sep, sep / b, m / sep, full, m / full])
        b, m, sep, full = (peak(kind, n, raw=True) for kind in KINDS)
        raw_rows.append([n, b, m, m / b, sep, m / sep, full, m / full])
    unit = "MB on the GPU (max_memory_allocated)" if any(r["metric"].startswith("torch") for r in results.values()) \
        else "MB of peak RSS above the child's RSS after its imports"
    detail = (f"Peaks in {unit}:\n\n" + md_table(
        ["N", "base alone", "marl", "marl / base", "separate (LoRA)", "separate / base", "**marl / separate**",
         "separate (full FT)", "marl / separate full"], rows)
        + "\n\nThe same, as raw peak RSS of the child process in MB (interpreter and libraries included):\n\n"
        + md_table(["N", "base alone", "marl", "marl / base", "separate (LoRA)", "marl / separate",
                    "separate (full FT)", "marl / separate full"], raw_rows))

    nmax, n1 = max(s.memory_ns), min(s.memory_ns)
    per_policy = (peak("marl", nmax) - peak("marl", n1)) / (nmax - n1) / peak("base", n1) if nmax > n1 else NAN
    per_adapter = (((peak("marl", nmax) - peak("base", nmax)) - (peak("marl", n1) - peak("base", n1)))
                   / (nmax - n1) / peak("base", n1)) if nmax > n1 else NAN
    n4 = 4 if 4 in s.memory_ns else nmax
    ratio4 = peak("marl", n4) / peak("separate", n4)
    meets = None if ratio4 != ratio4 or per_policy != per_policy else bool(ratio4 <= 0.25 and per_policy <= 0.05)
    w = next((r["weight_mb"] for r in results.values()), NAN)
    notes += [
        f"One copy of the base's weights is {w:.0f} MB; marl's peak above imports at N={n1} is "
        f"{peak('marl', n1):.0f} MB, so at this model size rollout and update activations, not weights, make most "
        "of every peak, which narrows each ratio against designs that only add weights; the gap between shared "
        "and separate grows with the model (`--hidden`, `--layers` give a larger one).",
        f"Each extra policy adds {per_policy:.1%} of the base-alone peak (N={n1}) in total, of which "
        f"{per_adapter:.1%} beyond generating its extra rollout rows (the slope of marl minus base-alone "
        f"over N={n1}..{nmax}).",
        f"A policy here costs its LoRA (r={s.lora_r}, all linear layers), its value head, their gradients and "
        "Adam state; relative to the base this shrinks as the model grows (LoRA scales with hidden size, the "
        "base with its square).",
        "The separate-copies baseline keeps the frozen reference and reward copies shared by all policies "
        "(2N+2 copies), which only favours it.",
    ]
    if any(r["peak_includes_load"] for r in results.values()):
        notes.append("The peak could not be reset after loading here, so the peaks include loading.")
    return Row("memory", (
        f"Peak memory of {s.memory_steps} PPO step(s) (after loading, peak reset) with N policies of "
        f"{s.prompts_per_policy} prompts each, {s.max_new_tokens} new tokens, each configuration in a fresh "
        "process. *base alone*: the base generating the same rollout batch (N x prompts rows), nothing else. "
        "*marl*: `MultiPolicyPPOTrainer` on one base. *separate*: the same PPO (`bench/separate.py`) with one "
        "full copy per role: per policy a policy copy and a value copy, plus one reference and one reward "
        "copy; *LoRA* trains the same LoRA as marl, *full FT* every weight of policy and value (TRL's "
        "PPOTrainer without peft)."), f"N={n4}: marl / separate (LoRA) = {fx(ratio4)}, marl / separate (full FT) = "
        f"{fx(peak('marl', n4) / peak('separate_full', n4))}; each extra policy +{per_policy:.1%}",
        meets, detail, notes, raw=results)


if __name__ == "__main__":
    main(run, child)
