"""Row 5: marl's PPO against its peers, on the same model, prompts, batch and lengths:
(a) TRL 0.11.4's multi-adapter PPOTrainer (the design marl replaces), in its own
virtualenv, and (b) TRL's current GRPOTrainer with peft, rewarded by the same reward
adapter (`MultiAdapterModel.score_texts` in a closure).

    python -m bench.peers --setup     # only build bench/.venv-trl011

Every trainer runs in a fresh child process: one policy (LoRA r, all linear layers),
`peer_batch` samples per PPO iteration, `ppo_epochs` passes in minibatches of
`mini_batch_size`, reference = the base with adapters disabled. marl runs first and last,
so drift of the machine during the row shows.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import (
    NAN,
    REPO,
    Assets,
    BenchError,
    Memory,
    Row,
    Settings,
    above,
    device_kwargs,
    fx,
    load_base,
    main,
    marl_steps,
    md_table,
    own_weights,
    run_bench_child,
    sps,
)

VENV = REPO / "bench" / ".venv-trl011"
TRL011_PINS = ["torch==2.13.0", "trl==0.11.4", "transformers==4.46.3", "peft==0.13.2", "accelerate==1.1.1", "rich"]


def ensure_trl011_venv() -> Path:
    """bench/.venv-trl011 with TRL 0.11.4 and the versions it runs with (built once, a few minutes)."""
    py = VENV / "bin" / "python"
    stamp = VENV / ".installed"
    if stamp.exists() and stamp.read_text() == " ".join(TRL011_PINS):
        return py
    print(f"bench: building {VENV.relative_to(REPO)} ({' '.join(TRL011_PINS)})", flush=True)
    subprocess.run(["python3", "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", *TRL011_PINS], check=True)
    stamp.write_text(" ".join(TRL011_PINS))
    return py


# --------------------------------------------------------------------------- children


def child(s: Settings, a: Assets, config: dict) -> dict:
    if config["which"] == "grpo":
        return _grpo(s, a)
    return _marl(s, a, s.rollout_policies if config["which"] == "marl_n" else 1)


def _check_score(model, a: Assets) -> float:
    """The reward of one fixed sequence (the first prompt + EOS): the same in every trainer's process."""
    ids = a.prompt_ids()[0] + [model.tokenizer.eos_token_id]
    t = torch.tensor([ids], device=model.device)
    return float(model.compute_reward_score(t, torch.ones_like(t))[0])


def _marl(s: Settings, a: Assets, n: int) -> dict:
    return marl_steps(s, a, n, lambda model, _: {"check_score": _check_score(model, a)},
                      prompts_per_policy=s.peer_batch)[2]


def _grpo(s: Settings, a: Assets) -> dict:
    """TRL's GRPOTrainer + peft; its reward function scores with marl's reward adapter on a second base copy."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer


    mem = Memory()
    torch.manual_seed(0)
    rm = load_base(a)
    rm.load_adapter(a.reward, "reward", role="reward")
    rm.eval()
    reward_copy_mb = sum(p.numel() * p.element_size() for p in rm.base.parameters()) / 2**20
    check = _check_score(rm, a)

    def reward_model(prompts, completions, **_):
        return rm.score_texts([p + c for p, c in zip(prompts, completions)]).tolist()

    B, G, mb = s.peer_batch, s.grpo_generations, s.mini_batch_size
    per_round = s.ppo_epochs * (B // mb)  # optimizer steps per generation round, as marl's ppo_epochs x minibatches
    rounds = s.warmup_steps + s.timed_steps
    texts = a.prompt_texts()
    data = Dataset.from_dict({"prompt": [texts[i % len(texts)] for i in range(rounds * B // G + B)]})
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=mb, gradient_accumulation_steps=1,
        steps_per_generation=B // mb, num_generations=G, num_iterations=s.ppo_epochs,
        max_completion_length=s.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, beta=0.05,
        learning_rate=s.learning_rate, lr_scheduler_type="constant", max_grad_norm=1.0, max_steps=rounds * per_round,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=not torch.cuda.is_available(),
        disable_dropout=True, seed=0, dataloader_num_workers=0, log_completions=False)
    lora = LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=0.0, target_modules="all-linear",
                      bias="none", task_type="CAUSAL_LM")
    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *args, **kw):
            marks.append(time.perf_counter())

        def on_step_end(self, state_args, state, control, **kw):
            if state.global_step % per_round == 0:
                marks.append(time.perf_counter())

    policy = AutoModelForCausalLM.from_pretrained(a.base, dtype=torch.float32, **device_kwargs())
    own_weights(policy)
    trainer = GRPOTrainer(model=policy, reward_funcs=reward_model, args=args, train_dataset=data, peft_config=lora,
                          processing_class=AutoTokenizer.from_pretrained(a.base), callbacks=[Clock()])
    mem.reset()
    trainer.train()
    times = [b - a_ for a_, b in zip(marks, marks[1:])][s.warmup_steps:]
    return {"step_s": times, "baseline_mb": mem.baseline, "peak_mb": mem.peak_mb(), "samples_per_step": B,
            "reward_copy_mb": reward_copy_mb, "check_score": check, "peak_includes_load": not mem.resettable}


# --------------------------------------------------------------------------- the row


def run(s: Settings, a: Assets) -> Row:
    """Row 5: marl PPO vs TRL 0.11.4 multi-adapter PPO vs TRL GRPOTrainer + peft."""
    res, notes = {}, []
    children = {"marl": ("marl", "peers-marl-1"), "trl011": ("trl011", "peers-trl011"), "grpo": ("grpo", "peers-grpo"),
                "marl_again": ("marl", "peers-marl-2"), "marl_n": ("marl_n", "peers-marl-n")}
    for key, (which, log) in children.items():  # marl first and last: the machine's drift shows
        try:
            res[key] = (run_bench_child("trl011_ppo", s, log, a, python=ensure_trl011_venv()) if which == "trl011"
                        else run_bench_child("peers", s, log, a, which=which))
        except (BenchError, subprocess.CalledProcessError) as e:
            notes.append(f"{key} failed: {e}")
    if "marl" in res and "marl_again" in res:  # one marl figure from both runs
        res["marl_both"] = {**res["marl"], "step_s": res["marl"]["step_s"] + res["marl_again"]["step_s"],
                            "peak_mb": max(res["marl"]["peak_mb"], res["marl_again"]["peak_mb"])}
    marl_key = "marl_both" if "marl_both" in res else ("marl" if "marl" in res else "marl_again")

    def speed(k):
        return sps(res.get(k))

    def peak(k):
        return above(res.get(k))

    grpo_adj = peak("grpo") - res["grpo"]["reward_copy_mb"] if "grpo" in res else NAN
    labels = {"marl": "marl PPO (first run)", "trl011": "TRL 0.11.4 multi-adapter PPOTrainer",
              "grpo": f"TRL GRPOTrainer + peft (G={s.grpo_generations})", "marl_again": "marl PPO (last run)",
              "marl_n": f"for context: marl PPO, {s.rollout_policies} policies side by side ({s.peer_batch} samples "
                        "each)"}

    def line(k):
        peer = k in ("trl011", "grpo")
        return [labels[k], speed(k), speed(marl_key) / speed(k) if peer else "", peak(k),
                peak(marl_key) / peak(k) if peer else "", res[k]["peak_mb"] if k in res else NAN,
                res[k]["check_score"] if k in res else NAN]

    reward_copy = f" ({res['grpo']['reward_copy_mb']:.0f} MB of weights)" if "grpo" in res else ""
    rows = [line("marl"), line("trl011"), line("grpo"),
            [f"GRPO without its reward copy{reward_copy}", "", "", grpo_adj, peak(marl_key) / grpo_adj, "", ""],
            line("marl_again"), line("marl_n")]
    detail = md_table(["trainer", "samples/s", "marl / this (speed)", "peak above imports (MB)",
                       "marl / this (memory)", "raw peak RSS (MB)", "reward of a fixed sequence"], rows)
    v_old, v_grpo = speed(marl_key) / speed("trl011"), speed(marl_key) / speed("grpo")
    m_old, m_grpo = peak(marl_key) / peak("trl011"), peak(marl_key) / grpo_adj
    ok = [v_old >= 1.2, v_grpo >= 1.0, m_old <= 1.0, m_grpo <= 1.0]
    meets = None if any(x != x for x in (v_old, v_grpo, m_old, m_grpo)) else all(ok)
    notes += [
        "marl's figures in the ratios pool its first and last run (median over all their iterations, the larger "
        "peak); the two runs bracket the peers in time, so their spread shows the drift of the machine.",
        "'reward of a fixed sequence' is the reward adapter's score of the same token sequence in each process: "
        "equal values show every trainer loaded the same base and reward adapter.",
        f"GRPO samples {s.grpo_generations} completions for each of {s.peer_batch // s.grpo_generations} prompts "
        f"({s.peer_batch} samples per generation round, like the PPO trainers' {s.peer_batch} prompts x 1); its "
        f"round is {s.ppo_epochs} passes x {s.peer_batch // s.mini_batch_size} minibatches of {s.mini_batch_size}, "
        "with the reference (adapters disabled, beta=0.05) and old log-probs computed as marl does; GRPO has "
        "no value head, so it does less work per sample than either PPO.",
        "GRPO's reward function holds a second copy of the base (a `MultiAdapterModel` with the reward adapter), "
        "as TRL's own reward-model path would; the memory target is checked against GRPO without that copy's "
        "weights (the line 'GRPO without its reward copy'), which favours GRPO.",
        "TRL 0.11.4 refuses quantized models on a CPU-only host, so this row is full precision.",
        f"The last line is not part of the comparison: marl training {s.rollout_policies} policies at once (one "
        "stacked-LoRA rollout and update for all), where each peer would need one run per policy.",
    ]
    return Row("peers", (
        f"Samples per second (samples per PPO iteration / median iteration time over {s.timed_steps} iterations "
        f"after {s.warmup_steps} warm-up) and peak memory after loading, one policy, {s.peer_batch} samples per "
        f"iteration, {s.max_new_tokens} new tokens, {s.ppo_epochs} epochs of minibatch {s.mini_batch_size}, "
        "same base, reward adapter, prompts and LoRA shape; each trainer in a fresh process."),
        f"vs TRL 0.11.4: {fx(v_old)} speed, {fx(m_old)} memory; vs GRPO: {fx(v_grpo)} speed, "
        f"{fx(m_grpo)} memory", meets, detail, notes, raw=res)


if __name__ == "__main__":
    if sys.argv[1:] == ["--setup"]:
        print(ensure_trl011_venv())
    else:
        main(run, child)
