"""Row 5: marl against its peers at the same algorithm, on the same model, prompts, batch and lengths.

- PPO (GAE, a value head on the policy's LoRA, a fixed KL coefficient 0.05 in the reward): marl against
  TRL 0.11.4's multi-adapter PPOTrainer (the design marl replaces), in its own virtualenv (bench/trl011_ppo.py);
- GRPO (G samples per prompt, beta 0.05 * k3 KL in the loss, no critic): marl's `advantage_estimator: grpo`
  against TRL's current GRPOTrainer with peft, rewarded by the same reward adapter (`MultiAdapterModel.score_texts`
  in a closure), at the same group size, epochs (`num_iterations`), minibatch and lengths.

    python -m bench.peers [--quick]   # the row alone, printed
    python -m bench.peers --setup     # only build bench/.venv-trl011

How it is timed, so that its ratios hold from run to run: on a shared machine the speed of every process
drifts by tens of percent over tens of seconds (docs/speed.md), so the two arms of a pair run in lockstep
(`run_lockstep`): two fresh processes load side by side, then take turns one step at a time, A B, B A, A B, ...,
each step running alone while the other process waits without using the CPU, `warmup_steps` untimed steps and
`peer_steps` timed ones each, one policy, `peer_batch` samples a step; `peer_rounds` rounds of fresh processes,
the first turn alternating between rounds. An arm's samples/s is the median over all its timed steps, with their
range; a pair's ratio is the median, with its range, over the pairs of neighbouring steps (the k-th timed step
of each process of a round). Each timed
step is split into phases: generate, reward, reference, old log-probs and the update (with the rest: the step
less the other phases); marl's from its step's time/* metrics, the peers' by wrapping their own methods in the
child process (bench/trl011_ppo.py; `_trl_grpo`), the installed packages unchanged. The machine's load
average is read before and after the row and in every process.

Then marl's fused passes before and after (`reuse_first_forward`, `stack_reference`): the variants' steps
alternate in one process (A B C A B C ...), `ablation_steps` each.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
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
    bench_child_cmd,
    device_kwargs,
    fx,
    live_tensor_mb,
    load_avg,
    load_base,
    main,
    marl_trainer,
    md_table,
    median,
    own_weights,
    phase_timer,
    ppo_args,
    run_bench_child,
    run_lockstep,
    spread,
    step_tensor_mb,
    timed,
    turn_gate,
    weights_mb,
)

VENV = REPO / "bench" / ".venv-trl011"
TRL011_PINS = ["torch==2.13.0", "trl==0.11.4", "transformers==4.46.3", "peft==0.13.2", "accelerate==1.1.1", "rich"]

ARMS = {  # key: (label, algorithm); a round runs them in this order, then with each pair swapped
    "marl_ppo": ("marl PPO", "ppo"),
    "trl011": ("TRL 0.11.4 multi-adapter PPOTrainer", "ppo"),
    "marl_grpo": ("marl GRPO", "grpo"),
    "trl_grpo": ("TRL GRPOTrainer + peft", "grpo"),
}
PAIRS = {"ppo": ("marl_ppo", "trl011", 1.2), "grpo": ("marl_grpo", "trl_grpo", 1.1)}  # marl, peer, speed target
PHASES = ("generate", "reward", "reference", "old_logprobs", "update")  # update: the step less the others
VARIANTS = {  # marl's fused passes on and off: label, PPOArgs settings
    "shipped": ("as shipped", {}),
    "no_reuse": ("reuse_first_forward: false", {"reuse_first_forward": False}),
    "no_fusion": ("reuse_first_forward, stack_reference: false", {"reuse_first_forward": False,
                                                                  "stack_reference": False}),
}


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


def same_length_prompts(a: Assets) -> Assets:
    """`a` with only the prompts of its most common token length (a file beside its prompts): every arm's batches
    then have the same shape whatever prompts it draws, so their step tensor peaks compare like with like (a
    batch's activations grow with its longest prompt, and the arms draw different prompts)."""
    from marl.io import atomic_write_json

    data = json.loads(Path(a.prompts).read_text())
    n = Counter(len(x) for x in data["ids"]).most_common(1)[0][0]
    path = Path(a.prompts).with_name(f"prompts-{n}-tokens.json")
    if not path.exists():
        keep = [i for i, x in enumerate(data["ids"]) if len(x) == n]
        atomic_write_json(path, {"texts": [data["texts"][i] for i in keep], "ids": [data["ids"][i] for i in keep]})
    return dataclasses.replace(a, prompts=str(path))


def marl_settings(s: Settings, algo: str) -> dict:
    """PPOArgs overrides of marl's arm of `algo` at its peer's settings: a fixed KL coefficient 0.05 in the reward
    (TRL 0.11.4's init_kl_coef, adap_kl_ctrl off), or GRPO's groups of `grpo_generations` and beta 0.05 * k3 in
    the loss (TRL GRPOTrainer's beta)."""
    kw = dict(prompts_per_policy=s.peer_batch, kl_coef=0.05, kl_target=None)
    if algo == "grpo":
        kw.update(advantage_estimator="grpo", num_generations=s.grpo_generations, kl_in="loss", beta=0.05)
    return kw


# --------------------------------------------------------------------------- children


def child(s: Settings, a: Assets, config: dict) -> dict:
    if config["which"] == "trl_grpo":
        return _trl_grpo(s, a, config.get("tensors", False), turn_gate(config.get("lockstep", False)))
    if config["which"] == "ablation":
        return _ablation(s, a, config["algo"])
    return _marl(s, a, config["algo"], config.get("n", 1), config.get("tensors", False),
                 turn_gate(config.get("lockstep", False)))


def _check_score(model, a: Assets) -> float:
    """The reward of one fixed sequence (the first prompt + EOS): the same in every trainer's process."""
    ids = a.prompt_ids()[0] + [model.tokenizer.eos_token_id]
    t = torch.tensor([ids], device=model.device)
    return float(model.compute_reward_score(t, torch.ones_like(t))[0])


def _marl_trainer(s: Settings, a: Assets, algo: str, n: int):
    """(model, trainer, the old-pass plan of each step): marl's arm of `algo` with `n` policies."""
    torch.manual_seed(0)
    model, trainer = marl_trainer(a, ppo_args(a, s, n, **marl_settings(s, algo)))
    plans = []
    plan = trainer.learner.old_pass_plan
    trainer.learner.old_pass_plan = lambda *args, **kw: plans.append(plan(*args, **kw)) or plans[-1]
    return model, trainer, plans


def _marl_step(trainer, plans: list) -> dict:
    """One timed PPO step of marl: its seconds, response tokens, old-pass plan and phases (its time/* metrics)."""
    out = []
    t = timed(lambda: out.append(trainer.step()))
    m = out[0]
    tokens = sum(m[f"{n}/response/length"] for n in trainer.policies) * trainer.cfg.prompts_per_policy
    return {"s": t, "tokens": round(tokens), "plan": plans[-1], "generate": m["time/generate"],
            "reward": m["time/score"], "reference": m["time/reference"], "old_logprobs": m["time/old_logprobs"]}


def _marl(s: Settings, a: Assets, algo: str, n: int, tensors: bool = False, gate=lambda: None) -> dict:
    mem = Memory()
    model, trainer, plans = _marl_trainer(s, a, algo, n)
    check = _check_score(model, a)
    mem.reset()
    load = [load_avg()]
    for _ in range(s.warmup_steps):
        gate()
        trainer.step()
    steps = []
    for _ in range(s.peer_steps):
        gate()
        steps.append(_marl_step(trainer, plans))
    load.append(load_avg())
    peak_mb = mem.peak_mb()  # before the step under TensorPeak, which is slow and makes Python objects
    if tensors:
        gate()
    return {"steps": steps, "step_s": [x["s"] for x in steps], "samples_per_step": n * s.peer_batch,
            "baseline_mb": mem.baseline, "peak_mb": peak_mb, "peak_includes_load": not mem.resettable,
            "check_score": check, "load": load, "step_tensor_mb": step_tensor_mb(trainer.step) if tensors else None}


def _ablation(s: Settings, a: Assets, algo: str) -> dict:
    """marl's arm of `algo` with each of `VARIANTS`, their steps alternating in this one process."""
    _, trainer, plans = _marl_trainer(s, a, algo, 1)
    shipped = {k: getattr(trainer.cfg, k) for _, kw in VARIANTS.values() for k in kw}

    def use(variant):
        for k, v in {**shipped, **VARIANTS[variant][1]}.items():
            setattr(trainer.cfg, k, v)  # the learner reads the same PPOArgs

    load = [load_avg()]
    for v in VARIANTS:  # a warm-up step of each
        use(v)
        trainer.step()
    out = {v: [] for v in VARIANTS}
    for _ in range(s.ablation_steps):
        for v in VARIANTS:
            use(v)
            out[v].append(_marl_step(trainer, plans))
    load.append(load_avg())
    return {"variants": out, "samples_per_step": s.peer_batch, "load": load}


def _trl_grpo(s: Settings, a: Assets, tensors: bool = False, gate=lambda: None) -> dict:
    """TRL's GRPOTrainer + peft; its reward function scores with marl's reward adapter on a second base copy.
    Phases: its own `_generate`, `_calculate_rewards` and no-grad `_get_per_token_logps_and_entropies` calls
    (the reference inside its `use_adapter`, else the old log-probs), timed in this process."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from trl.trainer import grpo_trainer

    from tests.memory import TensorPeak

    mem = Memory()
    torch.manual_seed(0)
    rm = load_base(a)
    rm.load_adapter(a.reward, "reward", role="reward")
    rm.eval()
    # what this arm holds twice: the copy's base weights (its reward adapter's LoRA counts, as marl's does)
    reward_copy_mb = weights_mb(rm)
    check = _check_score(rm, a)

    def reward_model(prompts, completions, **_):
        return rm.score_texts([p + c for p, c in zip(prompts, completions)]).tolist()

    B, G, mb = s.peer_batch, s.grpo_generations, s.mini_batch_size
    per_round = s.ppo_epochs * (B // mb)  # optimizer steps per generation round, as marl's ppo_epochs x minibatches
    timed_rounds = s.warmup_steps + s.peer_steps
    rounds = timed_rounds + tensors  # then one more under TensorPeak
    texts = a.prompt_texts()
    data = Dataset.from_dict({"prompt": [texts[i % len(texts)] for i in range(rounds * B // G + B)]})
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=mb, gradient_accumulation_steps=1,
        steps_per_generation=B // mb, num_generations=G, num_iterations=s.ppo_epochs,
        max_completion_length=s.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, beta=0.05,
        learning_rate=s.learning_rate, lr_scheduler_type="constant", max_grad_norm=1.0, max_steps=rounds * per_round,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=not torch.cuda.is_available(),
        disable_dropout=True, seed=0, dataloader_num_workers=0, log_completions=False,
        # TRL's configs default to bf16 autocast (even on a CPU) and to activation checkpointing; marl and TRL 0.11.4
        # run float32 without checkpointing here (docs/known-issues.md #20)
        bf16=False, gradient_checkpointing=False)
    lora = LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=0.0, target_modules="all-linear",
                      bias="none", task_type="CAUSAL_LM")
    phases: dict[str, float] = {}
    steps: list[dict] = []
    tokens = [0]
    marks: list[float] = []
    peak = {}  # the last round's tensors: live before it, TensorPeak over it

    class Clock(TrainerCallback):  # a step: one generation round and its optimizer steps, each after its turn
        def on_train_begin(self, *args, **kw):
            gate()
            marks.append(time.perf_counter())

        def on_step_end(self, state_args, state, control, **kw):
            if state.global_step % per_round:
                return
            steps.append({"s": time.perf_counter() - marks[-1], "tokens": tokens[0], **phases})
            phases.clear()
            if tensors and state.global_step == timed_rounds * per_round:
                peak.update(mem_peak_mb=mem.peak_mb(), resident=live_tensor_mb())
            if state.global_step < rounds * per_round:
                gate()
            if "resident" in peak and "mode" not in peak:  # the last round, under TensorPeak
                peak["mode"] = TensorPeak().__enter__()
            marks.append(time.perf_counter())

    policy = AutoModelForCausalLM.from_pretrained(a.base, dtype=torch.float32, **device_kwargs())
    own_weights(policy)
    trainer = GRPOTrainer(model=policy, reward_funcs=reward_model, args=args, train_dataset=data, peft_config=lora,
                          processing_class=AutoTokenizer.from_pretrained(a.base), callbacks=[Clock()])
    trainer._generate = phase_timer(phases, "generate", trainer._generate)
    trainer._calculate_rewards = phase_timer(phases, "reward", trainer._calculate_rewards)
    in_reference = [False]
    per_token_logps = trainer._get_per_token_logps_and_entropies

    def timed_logps(*args, **kw):
        if torch.is_grad_enabled():  # the update's forward
            return per_token_logps(*args, **kw)
        return phase_timer(phases, "reference" if in_reference[0] else "old_logprobs", per_token_logps)(*args, **kw)

    trainer._get_per_token_logps_and_entropies = timed_logps
    use_adapter = grpo_trainer.use_adapter  # the reference pass runs inside it (adapters disabled)

    @contextlib.contextmanager
    def marked_use_adapter(*args, **kw):
        in_reference[0] = True
        try:
            with use_adapter(*args, **kw):
                yield
        finally:
            in_reference[0] = False

    grpo_trainer.use_adapter = marked_use_adapter
    generate_and_score = trainer._generate_and_score_completions

    def counted(*args, **kw):
        out = generate_and_score(*args, **kw)
        tokens[0] = int(out["completion_mask"].sum())  # up to and including EOS
        return out

    trainer._generate_and_score_completions = counted
    mem.reset()
    load = [load_avg()]
    trainer.train()
    step_tensor = None
    if peak:
        peak["mode"].__exit__(None, None, None)
        step_tensor = peak["resident"] + peak["mode"].peak / 2**20
    load.append(load_avg())
    steps = steps[s.warmup_steps:timed_rounds]
    return {"steps": steps, "step_s": [x["s"] for x in steps], "baseline_mb": mem.baseline,
            "peak_mb": peak.get("mem_peak_mb") or mem.peak_mb(), "samples_per_step": B,
            "reward_copy_mb": reward_copy_mb, "check_score": check, "peak_includes_load": not mem.resettable,
            "load": load, "step_tensor_mb": step_tensor}


# --------------------------------------------------------------------------- the row


def _arm_child(s: Settings, a: Assets, key: str, r: int) -> tuple[list[str], str]:
    """(command, log name) of arm `key`'s process in round `r`, which waits for its turn before every step."""
    log, tensors = f"peers-{key}-{r + 1}", r == 0  # the first round's processes end with a step under TensorPeak
    if key == "trl011":
        return bench_child_cmd("trl011_ppo", s, a, ensure_trl011_venv(), tensors=tensors, lockstep=True), log
    if key == "trl_grpo":
        return bench_child_cmd("peers", s, a, which="trl_grpo", tensors=tensors, lockstep=True), log
    return bench_child_cmd("peers", s, a, which="marl", algo=ARMS[key][1], tensors=tensors, lockstep=True), log


def phase(step: dict, name: str) -> float:
    """Seconds of phase `name` in one timed step; "update" is the step less the other phases."""
    if name == "update":
        return step["s"] - sum(step.get(p, 0.0) for p in PHASES if p != "update")
    return step.get(name, 0.0)


def arm_stats(results: list[dict | None]) -> dict | None:
    """An arm's figures over its rounds: samples/s of every timed step, tokens per step, median phase seconds,
    the largest peak above imports."""
    ok = [r for r in results if r]
    if not ok:
        return None
    B = ok[0]["samples_per_step"]
    steps = [x for r in ok for x in r["steps"]]
    peak = max(r["peak_mb"] - r["baseline_mb"] for r in ok)
    tensors = next((r["step_tensor_mb"] for r in ok if r.get("step_tensor_mb")), NAN)
    return {"samples_per_step": B, "sps": [B / x["s"] for x in steps], "steps": len(steps),
            "tokens": [x["tokens"] for x in steps], "phases": {p: median([phase(x, p) for x in steps]) for p in PHASES},
            "step_s": median([x["s"] for x in steps]), "peak": peak, "raw_peak": max(r["peak_mb"] for r in ok),
            "peak_without_copy": peak - ok[0].get("reward_copy_mb", 0.0), "check": ok[0]["check_score"],
            "tensors": tensors, "tensors_without_copy": tensors - ok[0].get("reward_copy_mb", 0.0),
            "plans": sorted({x["plan"] for x in steps if "plan" in x}),
            "load": [x for r in ok for x in r.get("load", [])]}


def pair_ratio(m: list[dict | None], p: list[dict | None]) -> list[float]:
    """The ratio of marl's samples/s to the peer's in each pair of neighbouring timed steps, the k-th of each
    process of a round (`run_lockstep` ran them one after the other)."""
    return [(x["samples_per_step"] / sm["s"]) / (y["samples_per_step"] / sp["s"])
            for x, y in zip(m, p) if x and y for sm, sp in zip(x["steps"], y["steps"])]


def run(s: Settings, a: Assets) -> Row:
    """Row 5: marl PPO vs TRL 0.11.4 multi-adapter PPO, marl GRPO vs TRL GRPOTrainer + peft."""
    notes: list[str] = []
    a = same_length_prompts(a)
    load = [load_avg()]
    res: dict[str, list] = {k: [] for k in ARMS}
    for r in range(s.peer_rounds):
        for m, p, _ in PAIRS.values():
            pair = (m, p) if r % 2 == 0 else (p, m)  # who takes the first turn alternates between rounds
            try:
                out = run_lockstep({k: _arm_child(s, a, k, r) for k in pair}, 2 * s.child_timeout_s)
            except subprocess.CalledProcessError as e:  # building bench/.venv-trl011
                out = {k: e for k in pair}
            for k in pair:
                if isinstance(out[k], Exception):
                    notes.append(f"{k}, round {r + 1}: failed: {out[k]}")
                res[k].append(None if isinstance(out[k], Exception) else out[k])
    ablation = {}
    for algo in PAIRS if s.ablation_steps else ():
        try:
            ablation[algo] = run_bench_child("peers", s, f"peers-ablation-{algo}", a, which="ablation", algo=algo)
        except BenchError as e:
            notes.append(f"ablation {algo} failed: {e}")
    try:
        context = run_bench_child("peers", s, "peers-marl-n", a, which="marl", algo="ppo", n=s.rollout_policies)
    except BenchError as e:
        notes.append(f"marl with {s.rollout_policies} policies failed: {e}")
        context = None
    load.append(load_avg())
    stats = {k: arm_stats(v) for k, v in res.items()}
    return _row(s, res, stats, ablation, context, load, notes)


def _row(s: Settings, res: dict, stats: dict, ablation: dict, context: dict | None, load: list[float],
         notes: list[str]) -> Row:
    def get(k, f, default=NAN):
        return stats[k][f] if stats.get(k) else default

    arms = md_table(
        ["arm", "samples / step", "response tokens / step: mean [min-max]", "samples/s: median [min-max]",
         "timed steps", "peak above imports (MB)", "step tensor peak (MB)", "reward of a fixed sequence"],
        [[label, get(k, "samples_per_step"), _tokens(get(k, "tokens", [])), spread(get(k, "sps", [])),
          get(k, "steps", 0), get(k, "peak"), get(k, "tensors"), get(k, "check")] for k, (label, _) in ARMS.items()])
    ratios, verdicts, result = [], [], []
    for algo, (m, p, target) in PAIRS.items():
        pairs = pair_ratio(res[m], res[p])
        pooled = median(get(m, "sps", [])) / median(get(p, "sps", []))  # NaN for an arm not measured
        copy = "_without_copy" if p == "trl_grpo" else ""
        process = get(m, "peak") / get(p, "peak" + copy)
        tensors = get(m, "tensors") / get(p, "tensors" + copy)
        mem = tensors if tensors == tensors else process  # judged on the tensors where they were measured
        speed = median(pairs)
        ok = None if speed != speed or mem != mem else bool(speed >= target and mem <= 1.0)
        verdicts.append(ok)
        ratios.append([f"{ARMS[m][0]} / {ARMS[p][0]}", spread(pairs), len(pairs), pooled, tensors, process,
                       f">= {target}x, tensor peak <= 1x", {True: "yes", False: "**no**", None: "n/a"}[ok]])
        result.append(f"{algo.upper()} {spread(pairs)}{'x' if pairs else ''} samples/s, {fx(tensors)} tensor peak, "
                      f"{fx(process)} process peak")
    ratio_table = md_table(["marl / peer", "samples/s ratio: median [min-max] over neighbouring steps", "pairs",
                            "ratio of pooled medians", "step tensor peak ratio", "process peak ratio", "target",
                            "meets"], ratios)
    phase_rows = [[p.replace("_", " ")] + [get(k, "phases", {}).get(p, NAN) for k in ARMS] for p in PHASES]
    phase_rows.append(["step"] + [get(k, "step_s") for k in ARMS])
    phases = md_table(["phase: median seconds per step"] + [label for label, _ in ARMS.values()], phase_rows)
    detail = f"{arms}\n\n{ratio_table}\n\n{phases}"
    if ablation:
        detail += "\n\n" + _ablation_table(ablation)
    if context:
        c = arm_stats([context])
        detail += (f"\n\nFor context, not compared: marl PPO training {s.rollout_policies} policies at once "
                   f"({s.peer_batch} samples each, one stacked-LoRA pass for all): {spread(c['sps'])} samples/s, "
                   f"{c['peak']:.0f} MB above imports; each peer would need one run per policy.")
    meets = None if None in verdicts else all(verdicts)
    samples_equal = all(get(m, "samples_per_step") == get(p, "samples_per_step") for m, p, _ in PAIRS.values())
    samples = ", ".join(f"{label} {get(k, 'samples_per_step')}" for k, (label, _) in ARMS.items())
    plans = ", ".join(f"{label} {'/'.join(get(k, 'plans', []))}" for k, (label, _) in ARMS.items() if k.startswith("marl"))
    child_loads = [x for k in ARMS for x in get(k, "load", [])]
    notes += [
        f"Machine load average (1 min): {load[0]:.1f} before the row, {load[1]:.1f} after; "
        f"{min(child_loads, default=NAN):.1f}-{max(child_loads, default=NAN):.1f} at the start and end of its "
        "processes.",
        "Every arm draws from the same prompts, all of one token length (the most common one of the bench's "
        "prompts, `same_length_prompts`), so that any two arms' batches have the same shape whatever prompts each "
        "draws, and their tensor peaks compare like with like.",
        f"Each pair produces the same samples per step ({'yes' if samples_equal else '**no**'}: {samples}); "
        f"response tokens per step are the sampled lengths (up to {s.max_new_tokens} per sample, EOS included), "
        "per arm in the first table.",
        "Phases: marl's from its step's time/* metrics; TRL 0.11.4's and TRL GRPO's by wrapping their own methods "
        "in the child process (generate, reward, the no-grad log-prob passes); 'update' is the step less the other "
        "phases (the update's passes, optimizer steps, advantages and bookkeeping). No arm has a critic pass of "
        "its own: the PPO arms' value head sits on the policy's LoRA (its values come with the old log-probs, its "
        "loss in the update's backward), the GRPO arms have none.",
        "marl computes the old log-probs in a pass of their own only when the update cannot give them: with one "
        "minibatch of one micro-batch per iteration (reuse_first_forward) they are its first forward, detached, "
        "as TRL GRPO does when num_iterations = 1 and one optimizer step takes the whole generation batch; "
        "otherwise they share one stacked pass with the reference (stack_reference), and the rows of the "
        "update's first micro-batch still come from its forward (one policy). TRL 0.11.4 always runs both "
        f"passes. marl's old-pass plan here: {plans}.",
        f"GRPO samples {s.grpo_generations} completions for each of {s.peer_batch // s.grpo_generations} prompts; "
        f"both GRPO arms: {s.ppo_epochs} epoch(s) (num_iterations) of minibatches of {s.mini_batch_size}, beta "
        "0.05 (k3 KL to the base with adapters disabled, in the loss), the group's std division, the loss a token "
        "mean over the minibatch (TRL's loss_type dapo).",
        "GRPO's reward function holds a second copy of the base (a `MultiAdapterModel` with the reward adapter), "
        "as TRL's own reward-model path would; the memory ratios are taken against TRL GRPO's peaks less that "
        "copy's base weights, the part marl shares (each arm's reward adapter counts), which favours TRL GRPO: a "
        "TRL user's reward model is a second model.",
        "Memory is judged on the step tensor peak: every tensor alive before one more step after the timed ones, "
        "plus the peak of the tensors that step makes (`live_tensor_mb` + `TensorPeak`, one process an arm, the "
        "first round's), which is what a GPU's max_memory_allocated counts. The process peak (VmHWM above the RSS "
        "after imports, the largest over an arm's processes) also holds what glibc's heap keeps after tensors are "
        "freed and moves from run to run with it (docs/memory.md); it is shown beside.",
        "'reward of a fixed sequence' is the reward adapter's score of the same token sequence in each process: "
        "equal values show every trainer loaded the same base and reward adapter.",
        "TRL 0.11.4 refuses quantized models on a CPU-only host, so this row is full precision.",
        "Every arm runs float32 without activation checkpointing (TRL GRPO's config is given bf16=False and "
        "gradient_checkpointing=False: TRL's configs default to both on, docs/known-issues.md #20).",
    ]
    return Row("peers", (
        f"One policy, {s.peer_batch} samples per step, {s.max_new_tokens} new tokens, {s.ppo_epochs} epoch(s) of "
        f"minibatch {s.mini_batch_size}, same base, reward adapter, prompts and LoRA shape. Each pair of arms runs "
        f"in lockstep: two fresh processes load side by side, then take turns one step at a time (A B, B A, A B, "
        f"...; each step runs alone), {s.warmup_steps} warm-up and {s.peer_steps} timed steps each; "
        f"{s.peer_rounds} rounds of fresh processes, the first turn alternating: "
        f"{s.peer_rounds * s.peer_steps} timed steps per arm. samples/s: median [min-max] over every timed step; "
        "ratio: median [min-max] over the pairs of neighbouring steps (the k-th of each process); peak: the largest "
        "over an arm's processes, above the RSS after imports."),
        "; ".join(result), meets, detail, notes,
        raw={"arms": res, "ablation": ablation, "context": context, "load": load,
             "trl011": next((r for r in res["trl011"] if r), None)})


def _tokens(tokens: list[int]) -> str:
    """Response tokens per step as 'mean [min-max]', or 'n/a' for none."""
    return f"{sum(tokens) / len(tokens):.1f} [{min(tokens)}-{max(tokens)}]" if tokens else "n/a"


def _ablation_table(ablation: dict) -> str:
    """Each marl variant's samples/s, its ratio to the shipped one and its phases (median seconds)."""
    rows = []
    for algo, r in ablation.items():
        B = r["samples_per_step"]
        base = median([B / x["s"] for x in r["variants"]["shipped"]])
        for v, steps in r["variants"].items():
            sps = [B / x["s"] for x in steps]
            rows.append([f"marl {algo.upper()}", VARIANTS[v][0], ", ".join(sorted({x["plan"] for x in steps})),
                         spread(sps), median(sps) / base] + [median([phase(x, p) for x in steps]) for p in PHASES])
    return ("marl's passes before and after each fusion (the variants' steps alternating in one process; old-pass "
            "plan 'update': the old log-probs are the update's first forward, 'with_reference': they share the "
            "reference's stacked pass, whose seconds the reference column holds, 'own': a pass of their own):\n\n"
            + md_table(["arm", "variant", "old-pass plan", "samples/s: median [min-max]", "/ as shipped",
                        *(f"{p.replace('_', ' ')} (s)" for p in PHASES)], rows))


if __name__ == "__main__":
    if sys.argv[1:] == ["--setup"]:
        print(ensure_trl011_venv())
    else:
        main(run, child)
