"""Row 2: a 4-bit and an 8-bit (bitsandbytes) base against full precision: peak memory and
PPO step time of the same marl PPO.

Each quantization runs in a fresh child process: load (`MultiAdapterModel.from_pretrained(
quantization=...)`), reset the peak, `warmup_steps` + `timed_steps` PPO steps.
"""

from __future__ import annotations

from bench.common import (
    NAN,
    Assets,
    Row,
    Settings,
    above,
    fx,
    main,
    marl_steps,
    md_table,
    median,
    run_children,
)

QUANTIZATIONS = ("none", "8bit", "4bit")


def child(s: Settings, a: Assets, config: dict) -> dict:
    return {**config, **marl_steps(s, a, s.quant_policies, quantization=config["quantization"])[2]}


def run(s: Settings, a: Assets) -> Row:
    """Row 2: quantized base vs full precision (memory and PPO step time)."""
    notes = []
    res = run_children("quantized", s, a, {q: {"quantization": q} for q in QUANTIZATIONS}, notes)

    def peak(q):
        return above(res.get(q))

    def step(q):
        return median(res[q]["step_s"]) if q in res else NAN

    rows = [[q, res[q]["weight_mb"] if q in res else NAN, peak(q), peak(q) / peak("none"),
             res[q]["peak_mb"] if q in res else NAN, step(q), step(q) / step("none")] for q in QUANTIZATIONS]
    detail = md_table(["base", "weights (MB)", "peak above imports (MB)", "peak / full", "raw peak RSS (MB)",
                       "PPO step (s, median)", "step / full"], rows)
    m4, t4 = peak("4bit") / peak("none"), step("4bit") / step("none")
    meets = None if m4 != m4 or t4 != t4 else bool(m4 <= 0.45 and t4 <= 1.7)
    notes += [
        "On a CPU, bitsandbytes runs its 4-bit layers through its generic CPU path (and marl keeps them off the "
        "AVX512-BF16 inference kernel, docs/known-issues.md #1, because that kernel gives wrong gradients); step times on "
        "a GPU differ a lot. 8-bit on a CPU dequantizes per call.",
        "The embedding and LM head stay in full precision (bitsandbytes quantizes Linear layers of the decoder "
        "only); in a model this small they are a larger share than in a real LLM.",
        "The three children run one after another, not interleaved; on a busy machine compare with care.",
    ]
    return Row("quantized", (
        f"marl PPO with {s.quant_policies} policies ({s.prompts_per_policy} prompts each, {s.max_new_tokens} new "
        f"tokens, {s.ppo_epochs} PPO epochs) on a full-precision, 8-bit and 4-bit (NF4, double quant, float32 "
        f"compute) base, each in a fresh process: peak memory after loading over {s.warmup_steps} + "
        f"{s.timed_steps} steps, and the median time of the last {s.timed_steps} steps."),
        f"4-bit: memory {fx(m4)}, step {fx(t4)}; 8-bit: memory {fx(peak('8bit') / peak('none'))}, "
        f"step {fx(step('8bit') / step('none'))}", meets, detail, notes, raw=res)


if __name__ == "__main__":
    main(run, child)
