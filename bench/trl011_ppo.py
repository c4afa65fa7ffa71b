"""Row 5a child: TRL 0.11.4's multi-adapter PPO, the design marl replaces.

    bench/.venv-trl011/bin/python bench/trl011_ppo.py CONFIG.json

Runs only in bench/.venv-trl011 (torch 2.13 CPU, transformers 4.46.3, peft 0.13.2,
accelerate 1.1.1, trl 0.11.4; `python -m bench.peers --setup` builds it) and imports
nothing from marl or bench. As TRL's multi-adapter guide does it:
`AutoModelForCausalLMWithValueHead.from_pretrained(base, peft_config=lora,
reward_adapter=...)`, `PPOTrainer(config, model, ref_model=None, tokenizer)`, and per
step `generate` -> `compute_reward_score` -> `step`.

Two departures from the guide, neither changing the work done: the score is read at the
last real token (the guide reads index -1, a pad position for most rows,
docs/known-issues.md #6), and the reward adapter is a copy of marl's whose
adapter_config.json keeps only the keys peft 0.13 knows (peft 0.13 cannot read
peft 0.21's configs).

Prints one `BENCH_RESULT {...}` line: step times and peak memory, as bench/common.py does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path


def _status_mb(key: str) -> float:
    m = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(m.group(1)) / 1024


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


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


def main(cfg: dict) -> dict:
    warnings.filterwarnings("ignore")
    import torch
    import transformers
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

    transformers.logging.set_verbosity_error()
    cuda = torch.cuda.is_available()
    baseline = torch.cuda.memory_allocated() / 2**20 if cuda else _status_mb("VmRSS")
    torch.manual_seed(0)
    tmp = tempfile.mkdtemp()
    reward_dir = peft013_copy(cfg["reward"], os.path.join(tmp, "reward"))
    tok = AutoTokenizer.from_pretrained(cfg["base"])
    tok.pad_token = tok.pad_token or tok.eos_token
    tok.padding_side = "left"
    lora = LoraConfig(r=cfg["lora_r"], lora_alpha=cfg["lora_alpha"], lora_dropout=0.0, target_modules="all-linear",
                      bias="none", task_type="CAUSAL_LM")
    model = AutoModelForCausalLMWithValueHead.from_pretrained(cfg["base"], peft_config=lora,
                                                              reward_adapter=reward_dir)
    with torch.no_grad():  # own the weights, as bench/common.py own_weights does for the other trainers
        for p in model.parameters():
            if type(p) is torch.nn.Parameter and p.device.type == "cpu":
                p.data = p.data.clone()
    B = cfg["batch"]
    config = PPOConfig(batch_size=B, mini_batch_size=cfg["mini_batch_size"], ppo_epochs=cfg["ppo_epochs"],
                       learning_rate=cfg["learning_rate"], init_kl_coef=0.05, adap_kl_ctrl=False, cliprange=0.2,
                       cliprange_value=0.2, vf_coef=0.1, gamma=1.0, lam=0.95, max_grad_norm=1.0, seed=0,
                       gradient_accumulation_steps=1, log_with=None)
    trainer = PPOTrainer(config, model, ref_model=None, tokenizer=tok)
    gen = dict(max_new_tokens=cfg["max_new_tokens"], do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
               pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    prompts = cfg["prompt_ids"]
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

    def step():
        idx = torch.randint(len(prompts), (B,), generator=g).tolist()
        queries = [torch.tensor(prompts[i], device=dev) for i in idx]
        responses = trainer.generate(queries, batch_size=B, return_prompt=False, **gen)
        trainer.step(queries, responses, score(queries, responses))

    # the same model and reward adapter as marl's: the score of one fixed sequence, compared by the caller
    check = float(score([torch.tensor(prompts[0], device=dev)], [torch.tensor([], dtype=torch.long, device=dev)])[0])
    resettable = True
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        resettable = _reset_peak()
    for _ in range(cfg["warmup_steps"]):
        step()
    times = []
    for _ in range(cfg["timed_steps"]):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _status_mb("VmHWM")
    import trl

    return {"step_s": times, "baseline_mb": baseline, "peak_mb": peak, "peak_includes_load": not resettable,
            "samples_per_step": B, "check_score": check, "versions": {"trl": trl.__version__, "transformers": transformers.__version__,
                                                "torch": torch.__version__}}


if __name__ == "__main__":
    print("BENCH_RESULT " + json.dumps(main(json.loads(Path(sys.argv[1]).read_text()))), flush=True)
