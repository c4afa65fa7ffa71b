"""Row 5a child: TRL 0.11.4's multi-adapter PPO, the design marl replaces.

    bench/.venv-trl011/bin/python -m bench.trl011_ppo --child JSON     (bench/peers.py runs it)

Runs only in bench/.venv-trl011 (torch 2.13 CPU, transformers 4.46.3, peft 0.13.2,
accelerate 1.1.1, trl 0.11.4; `python -m bench.peers --setup` builds it) and imports
nothing from marl; from bench only bench/common.py's probes (which import torch alone). As TRL's multi-adapter guide does it:
`AutoModelForCausalLMWithValueHead.from_pretrained(base, peft_config=lora,
reward_adapter=...)`, `PPOTrainer(config, model, ref_model=None, tokenizer)`, and per
step `generate` -> `compute_reward_score` -> `step`.

Two departures from the guide, neither changing the work done: the score is read at the
last real token (the guide reads index -1, a pad position for most rows,
docs/known-issues.md #6), and the reward adapter is a copy of marl's whose
adapter_config.json keeps only the keys peft 0.13 knows (peft 0.13 cannot read
peft 0.21's configs).

Answers one `BENCH_RESULT {...}` line: step times and peak memory (with `tensors`, also one more step's tensor
peak, bench/common.py `step_tensor_mb`), as the other trainers' children, and each
timed step's phases, timed by wrapping the trainer's own methods in this process: generate (`generate`), reward
(the guide's `compute_reward_score` call), old log-probs and values (`step`'s first `batched_forward_pass`: the
policy with its value head), reference (its second, adapters disabled), and the update (the rest of `step`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

from bench.common import (
    Assets,
    Memory,
    Settings,
    emit,
    load_avg,
    own_weights,
    phase_timer,
    step_tensor_mb,
    timed,
    turn_gate,
)


def peft013_copy(adapter: str, out: str) -> str:
    """A copy of `adapter` whose adapter_config.json holds only fields peft 0.13's LoraConfig has."""
    from peft import LoraConfig

    shutil.copytree(adapter, out)
    path = Path(out) / "adapter_config.json"
    config = json.loads(path.read_text())
    known = {f.name for f in dataclasses.fields(LoraConfig)} | {"peft_type", "auto_mapping", "base_model_name_or_path",
                                                                  "revision", "task_type", "inference_mode"}
    path.write_text(json.dumps({k: v for k, v in config.items() if k in known}, indent=2))
    return out


def main(s: Settings, a: Assets, tensors: bool = False, gate=lambda: None) -> dict:
    warnings.filterwarnings("ignore")
    import torch
    import transformers
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

    transformers.logging.set_verbosity_error()
    mem = Memory()
    torch.manual_seed(0)
    reward_dir = peft013_copy(a.reward, os.path.join(tempfile.mkdtemp(), "reward"))
    tok = AutoTokenizer.from_pretrained(a.base)
    tok.pad_token = tok.pad_token or tok.eos_token
    tok.padding_side = "left"
    lora = LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=0.0, target_modules="all-linear",
                      bias="none", task_type="CAUSAL_LM")
    model = AutoModelForCausalLMWithValueHead.from_pretrained(a.base, peft_config=lora, reward_adapter=reward_dir)
    own_weights(model)  # as for the other trainers
    B = s.peer_batch
    config = PPOConfig(batch_size=B, mini_batch_size=s.mini_batch_size, ppo_epochs=s.ppo_epochs,
                       learning_rate=s.learning_rate, init_kl_coef=0.05, adap_kl_ctrl=False, cliprange=0.2,
                       cliprange_value=0.2, vf_coef=0.1, gamma=1.0, lam=0.95, max_grad_norm=1.0, seed=0,
                       gradient_accumulation_steps=1, log_with=None)
    trainer = PPOTrainer(config, model, ref_model=None, tokenizer=tok)
    gen = dict(max_new_tokens=s.max_new_tokens, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
               pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    prompts = a.prompt_ids()
    g = torch.Generator().manual_seed(0)
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    dev = trainer.accelerator.device

    def score(queries, responses):
        rows = [torch.cat([q, r, torch.tensor([tok.eos_token_id], device=q.device)]) for q, r in
                zip(queries, responses)]  # text + EOS, as TRL's RewardTrainer trained it
        width = max(len(x) for x in rows)
        ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long, device=dev)
        mask = torch.zeros_like(ids)
        for i, x in enumerate(rows):
            ids[i, :len(x)] = x
            mask[i, :len(x)] = 1
        scores = unwrapped.compute_reward_score(input_ids=ids, attention_mask=mask)  # (B, T, 1)
        last = mask.sum(1) - 1
        return [scores[i, last[i], 0].float() for i in range(len(rows))]

    phases: dict[str, float] = {}
    passes = [0]  # batched_forward_pass calls in this step: the old-policy pass, the reference, then the update's
    forward_pass = trainer.batched_forward_pass

    def timed_forward_pass(*args, **kwargs):
        passes[0] += 1
        if passes[0] > 2:
            return forward_pass(*args, **kwargs)
        return phase_timer(phases, ("old_logprobs", "reference")[passes[0] - 1], forward_pass)(*args, **kwargs)

    trainer.batched_forward_pass = timed_forward_pass
    tokens = [0]

    def step():
        phases.clear()
        passes[0] = 0
        idx = torch.randint(len(prompts), (B,), generator=g).tolist()
        queries = [torch.tensor(prompts[i], device=dev) for i in idx]
        responses = phase_timer(phases, "generate", trainer.generate)(queries, batch_size=B, return_prompt=False,
                                                                       **gen)
        tokens[0] = sum(len(r) for r in responses)  # padding removed, up to and including EOS
        trainer.step(queries, responses, phase_timer(phases, "reward", score)(queries, responses))

    # the same model and reward adapter as marl's: the score of one fixed sequence, compared by the caller
    check = float(score([torch.tensor(prompts[0], device=dev)], [torch.tensor([], dtype=torch.long, device=dev)])[0])
    mem.reset()
    load = [load_avg()]
    for _ in range(s.warmup_steps):
        gate()
        step()
    steps = []
    for _ in range(s.peer_steps):
        gate()
        t = timed(step)
        steps.append({"s": t, "tokens": tokens[0], **phases})
    load.append(load_avg())
    peak_mb = mem.peak_mb()  # before the step under TensorPeak
    import trl

    if tensors:
        gate()
    return {"steps": steps, "step_s": [x["s"] for x in steps], "baseline_mb": mem.baseline, "peak_mb": peak_mb,
            "peak_includes_load": not mem.resettable, "samples_per_step": B, "check_score": check, "load": load,
            "step_tensor_mb": step_tensor_mb(step) if tensors else None,
            "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__}}


if __name__ == "__main__":
    config = json.loads(sys.argv[2])
    emit(main(Settings(**config["settings"]), Assets(**config["assets"]), config.get("tensors", False),
              turn_gate(config.get("lockstep", False))))
