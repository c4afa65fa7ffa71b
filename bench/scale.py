"""Row 8 (issues 14, 20): PPO at Qwen2.5-0.5B's shape, 151,936-token vocabulary, against the peers.

    make bench ARGS="--only scale"          # into bench/RESULTS.md (~30 min on 2 CPU cores; a quiet machine)
    python -m bench.scale [--quick]         # the row alone, printed (--quick: a tiny Qwen2 shape, same vocabulary)
    python -m bench.scale --keep-peers --jobs 3   # marl's configurations only, 3 at a time (memory figures only)

The base is built in code with Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 heads, 2 KV heads,
intermediate 4864, vocabulary 151,936, tied embeddings; random weights, the default tokenizer, whose
1,536 ids are the first of the 151,936), saved and loaded through `from_pretrained`. Every
configuration runs in a fresh process: marl PPO with 1 and 4 policies (full precision and 4-bit; Adam, and
bitsandbytes' 8-bit AdamW: what each extra policy costs), the same update with activation checkpointing, the
same update with its loss taken on the hidden states (what the logits cost), and row 5's peers (marl PPO
against TRL 0.11.4's multi-adapter PPO, marl GRPO against TRL GRPO + peft, interleaved over rounds of fresh
processes, each step's phases side by side) at equal
prompts, lengths and samples per step.

Peaks: the process peak (VmHWM on the CPU, `max_memory_allocated` on a GPU) above the loaded model,
over whole PPO steps; and, for the update phase alone, the peak bytes of live tensors (counted op by
op, `TensorPeak`), which allocator caching cannot blur. The update-phase peak is broken into LoRA +
optimizer (counted), activations (the hidden-state-loss update) and logits (the difference).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from bench import peers as peers_row
from bench.common import (
    NAN,
    REPO,
    Assets,
    BenchError,
    Row,
    Settings,
    above,
    child_main,
    device_kwargs,
    ensure_assets,
    fx,
    load_base,
    marl_steps,
    marl_trainer,
    md_table,
    median,
    ppo_args,
    render_row,
    run_children,
    settings,
    sps,
    spread,
    step_tensor_mb,
    sync,
    timed,
)
from tests.memory import TensorPeak  # the tests measure with it too

QWEN05 = dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151_936)
TINY_QWEN = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=151_936)


# Warm-up steps of each peers' process at this shape: glibc's heap grows over a process's first steps (page faults),
# and after one warm-up TRL GRPO's first timed step ran 15-25% slower than its second (2026-12-07, all 3 rounds)
PEER_WARMUP_STEPS = 2


def scale_settings(s: Settings, gpu: bool = False) -> Settings:
    """Settings of the scale row: Qwen2.5-0.5B's shape (tiny with --quick), few prompts, short lengths."""
    shape = TINY_QWEN if s.quick else QWEN05
    small = dict(prompts_per_policy=4, max_new_tokens=8 if s.quick else 16, mini_batch_size=4, ppo_epochs=1,
                 peer_batch=4, grpo_generations=2, warmup_steps=1, timed_steps=1, rollout_policies=4, child_timeout_s=3600,
                 memory_ns=(1, 4), full_finetune_ns=(1,), quant_policies=2, repeats=3, multilora_steps=2,
                 multilora_rounds=2)
    if not s.quick:  # the peers: 2 rounds of lockstep pairs x 6 timed steps = 12 per arm (bench/peers.py), after
        # PEER_WARMUP_STEPS
        small.update(peer_rounds=2, peer_steps=6, ablation_steps=5)
    if gpu:  # a GPU does the 0.5B model in seconds: real batch and lengths; fewer processes (each loads the model)
        small.update(prompts_per_policy=16, max_new_tokens=64, mini_batch_size=8, peer_batch=16, grpo_generations=4,
                     timed_steps=2, peer_rounds=2, peer_steps=3, ablation_steps=0)
    return dataclasses.replace(s, arch="qwen2", **shape, **small)


# --------------------------------------------------------------------------- children


def _hidden_state_loss(trainer):
    """Replace the trainer's policy pass by the same forward whose 'log-probs' are a mean of the hidden
    states: the update then does all its work but the LM head and log-softmax."""
    model = trainer.model

    def policy_pass(names, rollout, rows, entropy=False):
        P = rollout.prompt_ids.shape[1]
        fwd = model.policy_forward if isinstance(names, str) else model.grouped_policy_forward
        hidden, values = fwd(names, rollout.input_ids[rows], rollout.attention_mask[rows], lm_head=False)
        lp = hidden[:, P - 1:-1].float().mean(-1)
        return lp, values[:, P - 1:-1], lp.detach() * 0 if entropy else None

    trainer.learner._policy_pass = policy_pass


def _update_phase(trainer):
    """(a function running the PPO update of a fresh rollout, its response tokens); no-grad passes done here."""
    from marl.ppo.rollout import reference_logprobs

    trainer.cfg.reuse_first_forward = False  # the update's first forward inside the measured update, not before it
    rollout = trainer.rollout()
    scores, _ = trainer.score(rollout, 0)
    ref_lp = reference_logprobs(trainer.model, None, rollout, trainer.cfg.forward_batch_size)
    shared = trainer.shares_passes(rollout)
    experiences = trainer.learner.make_experience(rollout, scores, ref_lp, shared=shared)
    return (lambda: trainer.learner.update(experiences, 0, shared=shared)), int(rollout.response_mask.sum())


def update_memory(s: Settings, ns=(1, 4)) -> list[list]:
    """Update-phase tensor peaks (MB) in one process: with and without checkpointing, log-prob loss and
    hidden-state loss, for each number of policies; the optimizer state exists before (a first update)."""
    a = ensure_assets(s)
    rows = []
    for n in ns:
        cfg = ppo_args(a, s, n, prompts_per_policy=s.peer_batch)
        model, trainer = marl_trainer(a, cfg)
        own_pass = trainer.learner._policy_pass
        update, _ = _update_phase(trainer)
        update()  # Adam's state now exists
        for loss in ("logprobs", "hidden"):
            trainer.learner._policy_pass = own_pass
            if loss == "hidden":
                _hidden_state_loss(trainer)
            for gc in (False, True):
                trainer.cfg.gradient_checkpointing = gc
                with TensorPeak() as tp:
                    update()
                rows.append([n, loss, gc, tp.peak / 2**20])
                print(f"scale: update memory: {rows[-1]}", flush=True)
        del model, trainer
    return rows


def child(s: Settings, a: Assets, config: dict) -> dict:
    """One marl configuration: whole PPO steps (process peak, samples/s), then one update phase under TensorPeak."""
    from marl.ppo.optim import optimizer_state_bytes

    def prepare(model, trainer):
        if config["loss"] == "hidden":
            _hidden_state_loss(trainer)
        return {}

    model, trainer, figures = marl_steps(s, a, config["n"], prepare, prompts_per_policy=s.peer_batch,
                                         gradient_checkpointing=config["gc"], quantization=config["quantization"],
                                         optim=config.get("optim", "adam"), **config.get("ppo", {}))
    lora = sum(p.numel() * p.element_size() for name in trainer.policies for p in model.trainable_parameters(name))
    state = sum(optimizer_state_bytes(st.optimizer) for st in trainer.states.values())
    figures["lora_opt_mb"] = (2 * lora + state) / 2**20  # weights, gradients, the optimizer's state
    for st in trainer.states.values():  # no gradients before the measured step (the steps free them too)
        st.optimizer.zero_grad(set_to_none=True)
    step_tensor = step_tensor_mb(trainer.step)  # one more step, every tensor counted: what a GPU would hold
    update, tokens = _update_phase(trainer)
    with TensorPeak() as tp:
        update()
    return {**config, **figures, "update_tensor_peak_mb": tp.peak / 2**20, "response_tokens": tokens,
            "update_tensor_live_after_mb": tp.live / 2**20, "step_tensor_peak_mb": step_tensor}


# --------------------------------------------------------------------------- the row

ARMS = {  # key: (label, n, quantization, activation checkpointing, loss, optim)
    "marl1": ("marl, 1 policy", 1, "none", False, "logprobs", "adam"),
    "marl4": ("marl, 4 policies", 4, "none", False, "logprobs", "adam"),
    "marl1_hidden": ("marl, 1 policy, loss on the hidden states (no LM head)", 1, "none", False, "hidden", "adam"),
    "marl1_gc": ("marl, 1 policy, gradient_checkpointing", 1, "none", True, "logprobs", "adam"),
    "marl1_4bit": ("marl, 1 policy, 4-bit base", 1, "4bit", False, "logprobs", "adam"),
    "marl4_4bit": ("marl, 4 policies, 4-bit base", 4, "4bit", False, "logprobs", "adam"),
    "marl1_8bit": ("marl, 1 policy, adamw_8bit", 1, "none", False, "logprobs", "adamw_8bit"),
    "marl4_8bit": ("marl, 4 policies, adamw_8bit", 4, "none", False, "logprobs", "adamw_8bit"),
    "marl4_4bit_8bit": ("marl, 4 policies, 4-bit base, adamw_8bit", 4, "4bit", False, "logprobs", "adamw_8bit"),
}
EXTRA_OF = {"marl4": "marl1", "marl4_4bit": "marl1_4bit", "marl4_8bit": "marl1_8bit"}  # 4 policies: their 1 policy
FULL_OF = {"marl1_4bit": "marl1", "marl4_4bit": "marl4", "marl4_4bit_8bit": "marl4_8bit"}  # 4-bit: full precision


PEERS_HEADER = "\n\nPeers at this shape (row 5's harness, same prompts, lengths and samples per step):\n\n"


def stored_peers() -> Row:
    """The peers' part of row 8 as bench/RESULTS.json holds it from an earlier run (their table, ratios and raw
    numbers), for a run that re-measures marl's configurations only (`--keep-peers`)."""
    old = json.loads((REPO / "bench" / "RESULTS.json").read_text())["rows"]["scale"]
    if PEERS_HEADER not in old["detail"] or "peers: " not in old["result"]:
        raise BenchError("bench/RESULTS.json holds no peers for row 8: run it with the peers")
    when = next((n.rsplit("those of ", 1)[1] for n in old["notes"] if n.startswith("peers not measured")),
                old["measured"])  # a row already rendered from stored peers keeps their date
    return Row("peers", "", old["result"].split("peers: ", 1)[1], None, old["detail"].split(PEERS_HEADER, 1)[1],
               [f"peers not measured in this run: their table and ratios are those of {when}"],
               raw=old["raw"].get("peers") or {})


def write_row(row: Row, flag: str = "--keep-peers") -> None:
    """Row 8 into bench/RESULTS.json, then bench/RESULTS.md from it (`run_all --render-only`), the other rows as
    they were."""
    raw_file = REPO / "bench" / "RESULTS.json"
    store = json.loads(raw_file.read_text())
    d = dataclasses.asdict(row)
    d.update(measured=dt.datetime.now().isoformat(timespec="minutes"), load=f"{os.getloadavg()[0]:.1f}")
    store["rows"]["scale"] = d
    store.update(command=f"{Path(sys.executable).name} -m bench.scale {flag}",
                 started=dt.datetime.now().isoformat(timespec="seconds"))
    raw_file.write_text(json.dumps(store, indent=1, default=str))
    subprocess.run([sys.executable, "-m", "bench.run_all", "--render-only"], cwd=REPO, check=True)


def run(s: Settings, a=None, peers: bool | str = True, jobs: int = 1, arms: list[str] | None = None) -> Row:
    """Row 8: the Qwen2.5-0.5B-shaped model; `a` (another row's model) is not used. `peers`: measure them (True),
    leave them out (False) or take them from bench/RESULTS.json ("stored"); `jobs`: configurations measured at
    once (each in its own process; more than 1 makes their samples/s meaningless); `arms`: measure only these
    configurations and take the others from bench/RESULTS.json (a configuration that failed, measured again)."""
    s = scale_settings(s, gpu=torch.cuda.is_available())
    a = ensure_assets(s)
    notes = []
    load, later = os.getloadavg()[0], []
    configs = {key: dict(n=n, quantization=quant, gc=gc, loss=loss, optim=optim)
               for key, (_, n, quant, gc, loss, optim) in ARMS.items() if not arms or key in arms}
    if jobs > 1:  # memory figures of a child do not depend on its neighbours; times do
        with ThreadPoolExecutor(jobs) as pool:
            parts = pool.map(lambda kv: run_children("scale", s, a, dict([kv]), notes), configs.items())
            res = {k: v for part in parts for k, v in part.items()}
    else:
        res = run_children("scale", s, a, configs, notes)
    load = max(load, os.getloadavg()[0])
    if arms:  # the others as bench/RESULTS.json holds them
        stored = json.loads((REPO / "bench" / "RESULTS.json").read_text())["rows"]["scale"]
        res = {**{k: v for k, v in stored["raw"]["arms"].items() if k in ARMS and k not in arms}, **res}
        earlier = [n.split(" measured in later runs")[0].split(" measured in a later run")[0].split(", ")
                   for n in stored["notes"] if " measured in " in n and " later run" in n]
        later = dict.fromkeys([*stored["raw"].get("later", []), *sum(earlier, []), *arms])  # earlier --arms runs too
        later = [k for k in later if k in res]
        if later:
            notes.append(f"{', '.join(later)} measured in later runs than the other configurations (same code)")
    peer_s = dataclasses.replace(s, warmup_steps=max(s.warmup_steps, PEER_WARMUP_STEPS)) if not s.quick else s
    peer_row = stored_peers() if peers == "stored" else (peers_row.run(peer_s, a) if peers else None)

    def get(k, f):
        return res[k][f] if k in res else NAN

    total = {k: above(res.get(k)) for k in ARMS}  # the process peak above imports
    tensors = {k: res[k].get("step_tensor_peak_mb", NAN) if k in res else NAN for k in ARMS}
    extra = {k: (total[k] - total[one]) / 3 / total[one] for k, one in EXTRA_OF.items()}
    vs_full = {k: total[k] / total[full] for k, full in FULL_OF.items()}
    extra_t = {k: (tensors[k] - tensors[one]) / 3 / tensors[one] for k, one in EXTRA_OF.items()}
    vs_full_t = {k: tensors[k] / tensors[full] for k, full in FULL_OF.items()}
    # the targets on the tensors, the counterpart of a GPU's max_memory_allocated; the process peak beside them
    judged = {k: v if v == v else extra[k] for k, v in extra_t.items()}
    judged_full = {k: v if v == v else vs_full[k] for k, v in vs_full_t.items()}
    rows = [[label, sps(res.get(k)), get(k, "weight_mb"), get(k, "lora_opt_mb"),
             above(res.get(k), base="after_load_mb"), get(k, "update_tensor_peak_mb"), total[k], tensors[k],
             f"+{100 * extra[k]:.1f}% / +{100 * extra_t[k]:.1f}%" if k in extra else "",
             f"{fx(vs_full[k])} / {fx(vs_full_t[k])}" if k in vs_full else ""]
            for k, (label, *_) in ARMS.items()]
    detail = md_table(["configuration", "samples/s", "weights (MB)", "LoRA + grads + optimizer (MB)",
                       "step peak above load (MB)", "update phase: tensor peak (MB)", "process peak above imports (MB)",
                       "step tensor peak (MB)", "each extra policy (of the 1-policy peak): process / tensors",
                       "4-bit / full precision: process / tensors"], rows)
    logits_ratio = get("marl1", "update_tensor_peak_mb") / get("marl1_hidden", "update_tensor_peak_mb")
    activations = get("marl1_hidden", "update_tensor_peak_mb")
    logits = get("marl1", "update_tensor_peak_mb") - activations
    gc_saving = 1 - get("marl1_gc", "update_tensor_peak_mb") / get("marl1", "update_tensor_peak_mb")
    q_ratio, q4_ratio, q4_ratio_8bit = judged_full["marl1_4bit"], judged_full["marl4_4bit"], judged_full["marl4_4bit_8bit"]
    breakdown = md_table(["component of marl's 1-policy update peak", "MB"], [
        ["weights (one base)", get("marl1", "weight_mb")], ["LoRA + grads + Adam (counted)", get("marl1", "lora_opt_mb")],
        ["activations (update with the loss on the hidden states)", activations],
        ["logits: LM head + log-softmax + entropy, chunked (the difference)", logits]])
    detail += "\n\n" + breakdown
    if peer_row is not None:
        detail += PEERS_HEADER + peer_row.detail
        notes += [f"peers: {peer_row.result}"] + [x for x in peer_row.notes if "failed" in x or "not measured" in x]
    checks = [logits_ratio <= 1.3, q_ratio <= 0.45, judged["marl4_8bit"] <= 0.05, q4_ratio <= 0.6,
              q4_ratio_8bit <= 0.6]
    figures = (logits_ratio, q_ratio, judged["marl4_8bit"], q4_ratio, q4_ratio_8bit)
    meets = None if any(x != x for x in figures) else all(checks) and bool(peer_row is None or peer_row.meets)
    notes += [
        "The update phase's tensor peak counts every tensor made during the update (forward, backward, optimizer "
        "step) while it is alive; weights and optimizer state made before are not in it.",
        f"Each response is at most {s.max_new_tokens} tokens; logprob_chunk_tokens 256, so one chunk of logits is "
        f"(256, {s.vocab}) float32 = {256 * s.vocab * 4 / 2**20:.0f} MB.",
        "Each extra policy: (peak of 4 policies - peak of 1) / 3, as a share of the 1-policy peak, for the same "
        "base and optimizer; 4-bit / full precision: the same policies and optimizer. Each on two peaks: the "
        "process's above imports (VmHWM on a CPU, which also holds what glibc's heap keeps after tensors are freed, "
        "docs/memory.md) and the step's tensors (every live tensor before one more step plus the peak of the "
        "tensors it makes, `live_tensor_mb` + `TensorPeak`: what a GPU's max_memory_allocated counts). The "
        "per-policy and 4-bit targets are judged on the tensors.",
        "LoRA + grads + optimizer: the trained policies' LoRA and value heads, their gradients and every tensor of "
        "their optimizers' state, counted after the steps (adam: float32 moments; adamw_8bit: uint8 moments and "
        "float32 block maxima for tensors of at least 4096 elements, marl/ppo/optim.py).",
    ]
    if jobs > 1:
        notes.append(f"The configurations ran {jobs} at a time, each in its own process: their memory figures are "
                     "valid, their samples/s are not.")
    elif load > (os.cpu_count() or 1):
        notes.append(f"The machine was shared while these configurations ran (load average up to {load:.1f} on "
                     f"{os.cpu_count()} cores): their samples/s are not valid; the memory figures are.")
    return Row("scale", (
        f"{s.describe_model()}; PPO with {s.peer_batch} samples per policy per step, {s.max_new_tokens} new tokens, "
        f"{s.ppo_epochs} epoch of minibatch {s.mini_batch_size}; {s.timed_steps} timed step(s) after "
        f"{s.warmup_steps} warm-up; each configuration in a fresh process."),
        f"update peak {fx(logits_ratio)} the hidden-state loss's; on the step's tensors: 4-bit {fx(q_ratio)} full "
        f"precision, with 4 policies {fx(q4_ratio)} (adam), {fx(q4_ratio_8bit)} (adamw_8bit), each extra policy "
        f"+{100 * judged['marl4']:.1f}% (adam), +{100 * judged['marl4_8bit']:.1f}% (adamw_8bit); on the process "
        f"peak: 4-bit {fx(vs_full['marl1_4bit'])}, with 4 policies {fx(vs_full['marl4_4bit'])}, "
        f"{fx(vs_full['marl4_4bit_8bit'])}, each extra policy +{100 * extra['marl4']:.1f}%, "
        f"+{100 * extra['marl4_8bit']:.1f}%; checkpointing saves "
        f"{100 * gc_saving:.0f}% of the update peak"
        + (f"; peers: {peer_row.result}" if peer_row is not None else ""),
        meets, detail, notes, raw={"arms": res, "peers": peer_row.raw if peer_row else None, "later": later})


def decode_bound(s: Settings) -> dict:
    """Greedy decode tokens/s of the bare base at batch 1 against the memory-bandwidth bound: each new
    token reads every weight once, so tokens/s <= bandwidth / weight bytes (bandwidth: a timed copy)."""
    from marl.model import MultiAdapterModel

    a = ensure_assets(s)
    cuda = torch.cuda.is_available()
    model = MultiAdapterModel.from_pretrained(a.base, quantization="bf16" if cuda else "none", **device_kwargs())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.base.parameters())
    x = torch.empty(2**28 if cuda else 2**24, dtype=torch.uint8, device=model.device)
    y = torch.empty_like(x)
    y.copy_(x)
    bw = 2 * x.numel() / min(timed(lambda: y.copy_(x)) for _ in range(5))  # read + write
    ids = torch.tensor([a.prompt_ids()[0]], device=model.device)
    new = 8 if s.quick else 64

    def gen():
        model.generate(ids, torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new, do_sample=False)

    gen()
    sync()
    tps = new / min(timed(gen) for _ in range(3))
    return {"dtype": str(model.base.dtype), "weights_mb": round(weight_bytes / 2**20), "tokens_per_s": round(tps, 1),
            "copy_bandwidth_gb_s": round(bw / 1e9, 1), "bound_tokens_per_s": round(bw / weight_bytes, 1),
            "fraction_of_bound": round(tps / (bw / weight_bytes), 3)}


def decode_profile(s: Settings, rounds: int = 5, top: int = 8) -> str:
    """Where a rollout's decode time goes at this shape: one policy's rollout rows (prompts_per_policy, max_new_tokens,
    marl's sampling: temperature 1, untruncated) through `MultiAdapterModel.generate`, the bare base and the base
    with a LoRA, the latter also with each of marl's two decode paths switched off (peft's own LoRA forward instead
    of `lean_lora`, transformers' torch.multinomial instead of `exact_sampling`), all interleaved over `rounds`;
    then torch.profiler's top ops of one LoRA call (per generated token)."""
    from torch.profiler import ProfilerActivity, profile

    import marl.model as marl_model
    from marl.ppo.rollout import left_pad

    torch.set_num_threads(2)
    a = ensure_assets(s)
    model = load_base(a)
    model.add_adapter("policy", ppo_args(a, s, 1).lora_config(dropout=0.0), role="policy")
    prompts = a.prompt_ids()
    rows = [prompts[i % len(prompts)] for i in range(s.prompts_per_policy)]
    ids, mask = left_pad(rows, model.tokenizer.pad_token_id, model.device)
    new = s.max_new_tokens
    lean, exact = marl_model.lean_lora, marl_model.exact_sampling

    def gen(name, lean_on=True, exact_on=True):
        def call():
            marl_model.lean_lora = lean if lean_on else (lambda layers: contextlib.nullcontext())
            marl_model.exact_sampling = exact if exact_on else (lambda kwargs: kwargs)
            try:
                return model.generate(ids, mask, adapter_names=name, max_new_tokens=new, min_new_tokens=new,
                                      do_sample=True, temperature=1.0, top_k=0)
            finally:
                marl_model.lean_lora, marl_model.exact_sampling = lean, exact
        return call

    arms = {"bare base": gen(None), "base + LoRA (marl)": gen("policy"),
            "base + LoRA, peft's LoRA forward": gen("policy", lean_on=False),
            "base + LoRA, torch.multinomial": gen("policy", exact_on=False),
            "base + LoRA, both (marl before)": gen("policy", lean_on=False, exact_on=False)}
    for fn in arms.values():
        fn()  # warm-up
    secs = {k: [] for k in arms}
    for _ in range(rounds):
        for k, fn in arms.items():
            secs[k].append(timed(fn))
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])]) as prof:
        arms["base + LoRA (marl)"]()
        sync()
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    ref = median(secs["base + LoRA (marl)"])
    calls = md_table(["call", "rows x new tokens", "seconds: median [min-max]", "ms per token", "/ marl"],
                     [[k, f"{len(rows)} x {new}", spread(v), 1000 * median(v) / new, f"{median(v) / ref:.3f}"]
                      for k, v in secs.items()])
    table = md_table(["op (one base + LoRA call)", "calls", "self CPU ms per token", "share of self CPU"],
                     [[e.key, e.count, e.self_cpu_time_total / 1000 / new, f"{100 * e.self_cpu_time_total / total:.1f}%"]
                      for e in ops])
    return f"{s.describe_model()}\n\n{calls}\n\n{table}"


def dry_run(out: str) -> None:
    """The CPU parts of bench/gpu_check.sh on a tiny Qwen2 shape: one configuration through the child's code
    (2 policies, checkpointing), in this process, and the decode bound; a small table to `out`."""
    torch.set_num_threads(1)
    s = scale_settings(settings(True))
    a = ensure_assets(s)
    r = child(s, a, {"n": 2, "quantization": "none", "gc": True, "loss": "logprobs"})
    d = decode_bound(s)
    table = md_table(["figure", "value"], [[k, v] for k, v in {**r, **d}.items() if not isinstance(v, list)])
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(f"# gpu_check dry run (CPU, {s.describe_model()})\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    if not child_main(child):
        ap = argparse.ArgumentParser(description="Row 8: PPO at Qwen2.5-0.5B's shape against the peers")
        ap.add_argument("--quick", action="store_true", help="a tiny Qwen2 shape (same vocabulary): a smoke test")
        ap.add_argument("--no-peers", action="store_true", help="only marl's configurations")
        ap.add_argument("--keep-peers", action="store_true", help="measure marl's configurations, take the peers "
                        "from bench/RESULTS.json, and write row 8 into bench/RESULTS.md and RESULTS.json")
        ap.add_argument("--arms", default="", help="with --keep-peers: only these configurations (comma-separated "
                        "keys of ARMS; none: no configuration), the others as bench/RESULTS.json holds them")
        ap.add_argument("--peers-only", action="store_true", help="measure only the peers at this shape (~13 min), "
                        "take marl's configurations from bench/RESULTS.json, and write row 8 into bench/RESULTS.md "
                        "and RESULTS.json")
        ap.add_argument("--jobs", type=int, default=1, help="with --keep-peers: configurations measured at once "
                        "(memory only: their samples/s are not valid then)")
        ap.add_argument("--dry-run", action="store_true", help="bench/gpu_check.sh --dry-run's part (tiny, CPU)")
        ap.add_argument("--decode-bound", action="store_true", help="only decode tokens/s against the bandwidth bound")
        ap.add_argument("--decode-profile", action="store_true", help="only where a rollout's decode time goes: the "
                        "bare base against base + LoRA, and the profiler's top ops per generated token")
        ap.add_argument("--update-memory", action="store_true", help="only the update phase's tensor peaks, one "
                        "process: checkpointing on/off, log-prob / hidden-state loss, 1 and 4 policies")
        ap.add_argument("--out", default=None, help="file for --dry-run (markdown) or --decode-bound (json)")
        args = ap.parse_args()
        if args.dry_run:
            dry_run(args.out or "bench/.cache/RESULTS-gpu-dry.md")
        elif args.update_memory:
            torch.set_num_threads(2)
            s = scale_settings(settings(args.quick))
            print(md_table(["policies", "loss", "gradient_checkpointing", "update tensor peak (MB)"],
                           update_memory(s)))
            print(s.describe_model())
        elif args.decode_profile:
            print(decode_profile(scale_settings(settings(args.quick), gpu=torch.cuda.is_available())))
        elif args.decode_bound:
            res = decode_bound(scale_settings(settings(args.quick), gpu=torch.cuda.is_available()))
            print(json.dumps(res))
            if args.out:
                Path(args.out).write_text(json.dumps(res))
        elif args.peers_only:
            row = run(settings(False), peers=True, arms=["none"])
            write_row(row, "--peers-only")
            print(render_row(row))
        elif args.keep_peers:
            row = run(settings(False), peers="stored", jobs=args.jobs, arms=[k for k in args.arms.split(",") if k])
            write_row(row)
            print(render_row(row))
        else:
            print(render_row(run(settings(args.quick), peers=not args.no_peers)))
