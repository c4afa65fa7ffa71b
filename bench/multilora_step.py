"""Row 7 (issue 7): a PPO step for N=4 policies with the stacked multi-LoRA path against peft's
path and against one pass per policy (`python -m bench.run_all --only multilora`).

Arms, each in a fresh child process (so peak memory does not mix), same prompts, seeds, lengths:

- batched: `multi_lora: batched` (default): one generate call, stacked LoRA; updates in passes
  mixing all policies, at most one policy's micro-batch of rows per pass (`update_pass_rows: 0`);
- batched, whole minibatches: the same with every policy's minibatch in one pass
  (`update_pass_rows` = N x mini_batch_size): fewer, larger passes;
- peft mixed: `multi_lora: peft`: peft's mixed-adapter generate (`adapter_names=`), then one
  pass per policy for everything else;
- one pass per policy: peft, and one generate call per policy (`mixed_batch: false`).

The arms alternate over `multilora_rounds` rounds (a slow spell of a shared machine hits all of
them); each reports the median step time of `multilora_steps` steps after a warm-up, its phases
and its peak memory after loading; the row takes the median over rounds.
"""

from __future__ import annotations

from bench.common import Assets, Memory, Row, Settings, fx, main, marl_trainer, md_table, median, ppo_args, run_bench_child

N_POLICIES = 4
PHASES = ("step", "generate", "score", "reference", "update")


def arms(s: Settings) -> dict[str, tuple[str, dict]]:
    return {
        "batched": ("**batched, marl's default** (update passes of one micro-batch, policy by policy)",
                    {"multi_lora": "batched"}),
        "batched_whole": ("batched, every policy's whole minibatch in one pass",
                          {"multi_lora": "batched", "update_pass_rows": N_POLICIES * s.mini_batch_size}),
        "peft": ("peft: mixed-adapter generate, then one pass per policy", {"multi_lora": "peft"}),
        "per_policy": ("one pass per policy, generation too", {"multi_lora": "peft", "mixed_batch": False}),
    }


def child(s: Settings, a: Assets, cfg: dict) -> dict:
    _, trainer = marl_trainer(a, ppo_args(a, s, N_POLICIES, **cfg["overrides"]))
    trainer.step()  # warm-up
    mem = Memory()
    mem.reset()
    steps = [trainer.step() for _ in range(s.multilora_steps)]
    return {**{k: median([m[f"time/{k}"] for m in steps]) for k in PHASES}, "peak_mb": mem.peak_mb()}


def run(s: Settings, a: Assets) -> Row:
    """Row 7: a PPO step for 4 policies, batched multi-LoRA vs peft vs one pass per policy."""
    runs: dict[str, list[dict]] = {k: [] for k in arms(s)}
    for rnd in range(s.multilora_rounds):
        for key, (_, overrides) in arms(s).items():
            runs[key].append(run_bench_child("multilora_step", s, f"multilora-{key}-{rnd}", a, overrides=overrides))
    r = {k: {m: median([x[m] for x in v]) for m in v[0]} for k, v in runs.items()}
    b = r["batched"]
    rows = [[label, r[k]["step"], r[k]["generate"], r[k]["score"] + r[k]["reference"], r[k]["update"],
             r[k]["peak_mb"], r[k]["step"] / b["step"], r[k]["peak_mb"] / b["peak_mb"]]
            for k, (label, _) in arms(s).items()]
    detail = md_table(["path", "step (s)", "generate (s)", "score + reference (s)", "update (s)", "peak memory (MB)",
                       "step / batched", "peak memory / batched"], rows)
    speed, mem = r["per_policy"]["step"] / b["step"], b["peak_mb"] / r["per_policy"]["peak_mb"]
    mem_peft = b["peak_mb"] / r["peft"]["peak_mb"]
    notes = [
        f"Against peft's mixed path the batched step is {fx(r['peft']['step'] / b['step'])} faster.",
        "The update phase (old log-probs and values, then the PPO epochs) does the same FLOPs whichever way the "
        "rows are grouped, so where it is compute-bound (a CPU) batching wins little there; it wins in generation "
        "(decode steps are bandwidth- and overhead-bound) and wherever passes are overhead-bound (small models, "
        "GPUs). `update_pass_rows` above one micro-batch trades activation memory for fewer, larger passes.",
        "Each figure is the median of the per-round medians; rounds alternate the arms, each arm in a fresh "
        "process. Peak memory is the child's peak after loading its model (see Setup).",
    ]
    return Row("multilora", (
        f"One PPO step of `MultiPolicyPPOTrainer` for {N_POLICIES} policies x {s.prompts_per_policy} prompts, "
        f"{s.max_new_tokens} new tokens, {s.ppo_epochs} PPO epochs of minibatch {s.mini_batch_size}: median of "
        f"{s.multilora_steps} steps after a warm-up, per arm and round, over {s.multilora_rounds} alternating "
        "rounds."),
        f"step {fx(speed)} faster than one pass per policy; peak memory {fx(mem)} of it ({fx(mem_peft)} of peft's)",
        bool(speed >= 1.5 and mem <= 1.0 and mem_peft <= 1.0), detail, notes, raw=runs)


if __name__ == "__main__":
    main(run, child)
