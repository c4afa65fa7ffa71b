"""What every benchmark row shares: settings, the bench model, memory and time probes, child processes
(`python -m bench.<row> --child JSON`, answering one `BENCH_RESULT {...}` line) and result tables. How
memory and time are measured: RESULTS.md's Setup (`bench/run_all.py: render`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import json
import logging
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / "bench" / ".cache"
RESULT_TAG = "BENCH_RESULT "
READY_TAG = "BENCH_READY"  # a child waits for its turn (`turn_gate`)
NAN = float("nan")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class BenchError(RuntimeError):
    """A configuration that could not be measured (the row reports it and the others go on)."""


# --------------------------------------------------------------------------- settings


@dataclass
class Settings:
    """Model shape, PPO shape and repeat counts of one bench run (full or --quick)."""

    quick: bool = False
    hidden: int = 512  # Llama, vocabulary of the default tokenizer (1536), intermediate 4 * hidden
    layers: int = 8
    heads: int = 8
    arch: str = "llama"  # or qwen2 (bench/scale.py): the shape below, tied embeddings, the default tokenizer
    kv_heads: int = 0  # qwen2 only
    intermediate: int = 0  # qwen2 only
    vocab: int = 0  # qwen2 only: the model's vocabulary (the tokenizer's 1536 ids come first)
    lora_r: int = 16  # every LoRA: all linear layers, alpha = 2r
    prompts_per_policy: int = 8
    max_prompt_length: int = 24
    max_new_tokens: int = 32
    mini_batch_size: int = 8
    ppo_epochs: int = 2
    learning_rate: float = 1e-4
    warmup_steps: int = 1  # PPO steps run before timing (allocations, lazy init)
    timed_steps: int = 3  # PPO steps timed after the warm-up (median)
    repeats: int = 5  # repeats of each timed pass or generate call (median)
    memory_ns: tuple[int, ...] = (1, 2, 4, 8)
    memory_steps: int = 2  # PPO steps per memory configuration (the second has optimizer state)
    full_finetune_ns: tuple[int, ...] = (1, 4)  # separate copies trained in full (Adam on every weight)
    quant_policies: int = 2
    rollout_policies: int = 4
    peer_batch: int = 16  # rows per PPO step in the peers row (one policy)
    grpo_generations: int = 4
    peer_rounds: int = 2  # peers rows: rounds of fresh processes, each pair of arms in lockstep (`run_lockstep`)
    peer_steps: int = 6  # peers rows: timed steps per process after the warm-up (x peer_rounds per arm)
    ablation_steps: int = 5  # peers rows: timed steps of each marl variant, alternating in one process
    multilora_steps: int = 5  # row 7: timed PPO steps per arm and round (median)
    multilora_rounds: int = 2  # row 7: the arms alternate this many times (median)
    learning_steps: int = 20  # row 6: PPO iterations per run (configs/ppo.yaml)
    learning_seeds: tuple[int, ...] = (0, 1, 2)
    learning_budget_min: float = 25.0
    child_timeout_s: int = 1800

    def __post_init__(self):  # read back from JSON: lists to tuples
        for k in ("memory_ns", "full_finetune_ns", "learning_seeds"):
            setattr(self, k, tuple(getattr(self, k)))

    @property
    def lora_alpha(self) -> int:
        return 2 * self.lora_r

    def describe_model(self) -> str:
        if self.arch == "qwen2":
            return (f"Qwen2, hidden {self.hidden}, {self.layers} layers, {self.heads} heads ({self.kv_heads} KV), "
                    f"intermediate {self.intermediate}, vocab {self.vocab:,}, tied embeddings (random weights)")
        return f"Llama, hidden {self.hidden}, {self.layers} layers, {self.heads} heads, vocab 1536 (random weights)"


def settings(quick: bool) -> Settings:
    if not quick:
        return Settings()
    return Settings(quick=True, hidden=64, layers=2, heads=4, lora_r=8, prompts_per_policy=4, max_prompt_length=16,
                    max_new_tokens=8, mini_batch_size=4, ppo_epochs=1, timed_steps=1, repeats=2, memory_ns=(1, 2),
                    memory_steps=1, full_finetune_ns=(1,), quant_policies=2, rollout_policies=4, peer_batch=8,
                    grpo_generations=2, peer_rounds=2, peer_steps=3, ablation_steps=2, multilora_steps=1, multilora_rounds=1, learning_steps=2, learning_seeds=(0, 1), learning_budget_min=5.0,
                    child_timeout_s=600)


# --------------------------------------------------------------------------- the bench model


@dataclass
class Assets:
    """Paths of a bench base model (random Llama + default tokenizer), its reward adapter and prompts."""

    base: str
    reward: str
    prompts: str  # json: {"texts": [...], "ids": [[...], ...]}
    n_params: int

    def prompt_ids(self) -> list[list[int]]:
        return json.loads(Path(self.prompts).read_text())["ids"]

    def prompt_texts(self) -> list[str]:
        return json.loads(Path(self.prompts).read_text())["texts"]


def ensure_assets(s: Settings) -> Assets:
    """Build (once, cached under bench/.cache/assets) the base, a reward adapter and the prompts.

    The base is saved with `save_pretrained` and every row loads it with `from_pretrained`.
    The reward adapter is a SEQ_CLS LoRA with a score head, as `marl reward` writes it, with
    random weights (B matrices too, so it is not the identity); speed and memory do not
    depend on what it learned.
    """
    from marl.default import BUILDER_VERSION

    key = f"{BUILDER_VERSION}-llama-h{s.hidden}-l{s.layers}-a{s.heads}-r{s.lora_r}-p{s.max_prompt_length}"
    if s.arch == "qwen2":
        key = (f"{BUILDER_VERSION}-qwen2-h{s.hidden}-l{s.layers}-a{s.heads}-k{s.kv_heads}-i{s.intermediate}"
               f"-v{s.vocab}-r{s.lora_r}-p{s.max_prompt_length}-rope")
    root = CACHE / "assets" / key
    assets = Assets(str(root / "base"), str(root / "reward"), str(root / "prompts.json"), 0)
    done = root / "done.json"
    if done.exists():
        assets.n_params = json.loads(done.read_text())["n_params"]
        return assets
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from marl.default import ensure_default_data, save_tiny_random_llama
    from marl.io import atomic_write_json
    from marl.model import ADAPTER_META, base_fingerprint

    root.mkdir(parents=True, exist_ok=True)
    if s.arch == "qwen2":
        save_qwen_shaped(root / "base", s)
    else:
        save_tiny_random_llama(root / "base", hidden_size=s.hidden, num_layers=s.layers, num_heads=s.heads, seed=0)
    tok = AutoTokenizer.from_pretrained(assets.base)
    torch.manual_seed(1)
    rm = AutoModelForSequenceClassification.from_pretrained(assets.base, num_labels=1,
                                                             pad_token_id=tok.pad_token_id)
    n_params = sum(p.numel() for n, p in rm.named_parameters() if "score" not in n)
    lora = LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=0.0, target_modules="all-linear",
                      task_type="SEQ_CLS", modules_to_save=["score"])
    rm = get_peft_model(rm, lora)
    with torch.no_grad():
        for n, p in rm.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.02)
    rm.save_pretrained(assets.reward, safe_serialization=True)
    atomic_write_json(Path(assets.reward) / ADAPTER_META, {
        "name": "reward", "role": "reward", "base_model": assets.base,
        "base_fingerprint": base_fingerprint(assets.base), "eos_appended": True})

    rows = [json.loads(line)["prompt"] for line in
            (ensure_default_data() / "prompts_train.jsonl").read_text().splitlines() if line.strip()]
    ids = [tok(t)["input_ids"] for t in rows]
    keep = [(t, i) for t, i in zip(rows, ids) if len(i) <= s.max_prompt_length]
    Path(assets.prompts).write_text(json.dumps({"texts": [t for t, _ in keep], "ids": [i for _, i in keep]}))
    done.write_text(json.dumps({"n_params": n_params}))
    assets.n_params = n_params
    return assets


def save_qwen_shaped(out_dir, s: Settings):
    """A random Qwen2 causal LM of `s`'s shape with the default tokenizer, saved with `save_pretrained`."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from marl.default import save_tiny_random_llama

    out = Path(out_dir)
    save_tiny_random_llama(out, hidden_size=32, num_layers=1, num_heads=4)  # for the default tokenizer's files
    tok = AutoTokenizer.from_pretrained(out)
    for f in out.glob("*.safetensors"):
        f.unlink()
    cfg = Qwen2Config(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
                      num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                      tie_word_embeddings=True, max_position_embeddings=32768, rope_theta=1_000_000.0,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(out)
    # transformers 5 writes rope_theta inside rope_parameters; TRL 0.11.4's transformers 4.46 reads only the top-level
    # key (else 10,000): both keys, so that every trainer of rows 5 and 8 loads the same model
    config = json.loads((out / "config.json").read_text())
    config["rope_theta"] = config["rope_parameters"]["rope_theta"]
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


# --------------------------------------------------------------------------- marl PPO harness


def device_kwargs() -> dict:
    """from_pretrained kwargs that put the base on the GPU when there is one."""
    return {"device_map": {"": 0}} if torch.cuda.is_available() else {}


def ppo_args(assets: Assets, s: Settings, n_policies: int, *, prompts_per_policy: int | None = None, **overrides):
    """The PPOArgs every row uses: N policies (seeds 0..N-1), reward adapter, no sft (reference = bare base)."""
    from marl.config import PPOArgs

    kw = dict(model_name_or_path=assets.base, run_dir=str(CACHE / "unused-run"), reward_adapter=assets.reward,
              sft_adapter="none", report_to="none", lora_r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=0.0,
              policies=[{"name": f"policy_{i}", "seed": i} for i in range(n_policies)],
              prompts_per_policy=prompts_per_policy or s.prompts_per_policy, max_prompt_length=s.max_prompt_length,
              max_new_tokens=s.max_new_tokens, mini_batch_size=s.mini_batch_size, ppo_epochs=s.ppo_epochs,
              learning_rate=s.learning_rate, value_model="head")  # marl_trainer puts the value head on the policy
    kw.update(overrides)
    return PPOArgs(**kw)


def load_base(a: Assets, quantization: str = "none"):
    """The bench base as a `MultiAdapterModel` on the device, owning its weights (`own_weights`)."""
    from marl.model import MultiAdapterModel

    model = MultiAdapterModel.from_pretrained(a.base, quantization=quantization, **device_kwargs())
    own_weights(model.base)
    return model


def marl_trainer(assets: Assets, cfg):
    """(model, trainer): one base (`cfg.quantization`), the reward adapter, one LoRA + value head per policy,
    built as `marl ppo` builds them (`marl.build`)."""
    from marl.ppo.trainer import MultiPolicyPPOTrainer
    from marl.build import build_ppo_model

    specs = cfg.resolved_policies()
    model, _ = build_ppo_model(cfg, specs, assets.reward, model=load_base(assets, cfg.quantization))
    return model, MultiPolicyPPOTrainer(model, cfg, specs, assets.prompt_ids(), ref_adapter=None)


def marl_steps(s: Settings, a: Assets, n: int, prepare=None, **overrides) -> tuple:
    """In a child: `marl_trainer` for `n` policies (`ppo_args` overrides), `prepare(model, trainer)` (its extra
    figures), the peak reset, `timed_steps`: (model, trainer, the memory figures in MB, step times and extras)."""
    mem = Memory()
    torch.manual_seed(0)
    model, trainer = marl_trainer(a, ppo_args(a, s, n, **overrides))
    extra = prepare(model, trainer) if prepare else {}
    load_peak = mem.peak_mb()
    mem.reset()
    after_load = mem.current_mb()
    times = timed_steps(trainer.step, s)
    return model, trainer, {**extra, "baseline_mb": mem.baseline, "load_peak_mb": load_peak,
                            "after_load_mb": after_load, "peak_mb": mem.peak_mb(), "weight_mb": weights_mb(model),
                            "step_s": times, "samples_per_step": n * trainer.cfg.prompts_per_policy,
                            "peak_includes_load": not mem.resettable, "metric": mem.kind}


def own_weights(module) -> None:
    """Copy weights still memory-mapped from the checkpoint into memory this process owns.

    transformers 5 leaves float32 weights mapped from the safetensors file: pages become resident
    only when touched (and peak RSS counts them once per mapping). Copying them makes every model
    own its weights as it would on a GPU, so memory figures do not depend on which pages a run
    happened to touch. bitsandbytes parameters (already computed) are left alone.
    """
    with torch.no_grad():
        for p in module.parameters():
            if type(p) is torch.nn.Parameter and p.device.type == "cpu":
                p.data = p.data.clone()


def randomize_lora_b(model, names, std: float = 0.02, seed: int = 0) -> None:
    """Give adapters `names` non-zero B matrices (peft starts them at 0, i.e. the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.lm.named_parameters():
            if "lora_B" in n and any(f".{a}." in n for a in names):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def sample_prompt_batch(a: Assets, model, n: int, per_policy: int):
    """(ids, mask) on `model`'s device: the left-padded prompt batch of the first PPO step of `n` policies
    (seeds 0..n-1, the trainer's sampling)."""
    from marl.ppo.rollout import pad_rows

    prompt_ids, rows = a.prompt_ids(), []
    for seed in range(n):
        g = torch.Generator().manual_seed(seed)
        rows += [prompt_ids[i] for i in torch.randint(len(prompt_ids), (per_policy,), generator=g).tolist()]
    return tuple(x.to(model.device) for x in pad_rows(rows, model.tokenizer.pad_token_id, "left"))


def preload() -> None:
    """Import every library a child will use, so its baseline RSS (taken next) holds their code and
    'peak above the baseline' counts what the models and the work take, not library imports."""
    for mod in ("torch", "transformers", "peft", "safetensors.torch", "transformers.models.llama.modeling_llama",
                "transformers.generation.utils", "marl.default", "marl.model", "marl.ppo.trainer", "marl.evaluate",
                "bench.separate"):
        importlib.import_module(mod)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        pass


def quiet() -> None:
    """Silence per-call warnings of the dependencies in child processes."""
    import transformers

    warnings.filterwarnings("ignore")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()


# --------------------------------------------------------------------------- memory and time


def _status_mb(key: str) -> float:
    text = Path("/proc/self/status").read_text()
    m = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) / 1024 if m else float("nan")


class Memory:
    """Peak memory of this process: VmHWM (resettable) on the CPU, allocated bytes on a GPU."""

    def __init__(self):
        self.cuda = torch.cuda if torch.cuda.is_available() else None
        self.kind = "torch.cuda.max_memory_allocated" if self.cuda else "peak RSS (VmHWM)"
        self.resettable = True
        self.baseline = self.current_mb()  # made first in a child: its interpreter and libraries, no model yet

    def current_mb(self) -> float:
        return self.cuda.memory_allocated() / 2**20 if self.cuda else _status_mb("VmRSS")

    def reset(self) -> None:
        if self.cuda:
            self.cuda.synchronize()
            self.cuda.reset_peak_memory_stats()
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        except OSError:
            self.resettable = False  # then the peak includes loading

    def peak_mb(self) -> float:
        if self.cuda:
            self.cuda.synchronize()
            return self.cuda.max_memory_allocated() / 2**20
        if not self.resettable:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return _status_mb("VmHWM")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> float:
    """Seconds one call of `fn` takes (GPU work included)."""
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def interleaved(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Time every function of `fns` `repeats` times after a warm-up, alternating between them (A B C A B C ...)."""
    for fn in fns.values():
        fn()
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            out[k].append(timed(fn))
    return out


def phase_timer(acc: dict, name: str, fn):
    """`fn`, each call's seconds (GPU work included) added to `acc[name]`: a peer's own method wrapped in the
    bench's child process to time its phases (the installed package is not changed)."""

    @functools.wraps(fn)
    def timed_call(*args, **kwargs):
        sync()
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            sync()
            acc[name] = acc.get(name, 0.0) + time.perf_counter() - t

    return timed_call


def load_avg() -> float:
    """The machine's load average over the last minute."""
    return os.getloadavg()[0]


def timed_steps(step, s: Settings) -> list[float]:
    """Seconds of `s.timed_steps` calls of `step` after `s.warmup_steps` untimed ones."""
    for _ in range(s.warmup_steps):
        step()
    return [timed(step) for _ in range(s.timed_steps)]


def median(xs) -> float:
    return statistics.median(xs) if xs else NAN


def weights_mb(model) -> float:
    """MB of one copy of a `MultiAdapterModel`'s base weights (LoRA left out)."""
    return sum(p.numel() * p.element_size() for n, p in model.base.named_parameters() if "lora_" not in n) / 2**20


def live_tensor_mb() -> float:
    """MB of every tensor storage the process holds now, each counted once (weights, adapters, optimizer
    state, buffers, whatever Python reaches): with `TensorPeak` over the work that follows, the CPU's
    counterpart of a GPU's `max_memory_allocated`, which counts tensors and none of the allocator's slack."""
    import gc

    gc.collect()
    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor) or obj.is_meta:
                continue
            st = obj.untyped_storage()
            key = (st.device, st.data_ptr())
        except (RuntimeError, NotImplementedError):  # tensor subclasses without a plain storage
            continue
        if key not in seen and st.data_ptr():
            seen.add(key)
            total += st.nbytes()
    return total / 2**20


def step_tensor_mb(step) -> float:
    """One step's tensor peak in MB: `live_tensor_mb` before `step()` plus the peak of the tensors it makes
    (`TensorPeak`), which is what a GPU's max_memory_allocated counts. Every op then goes through Python: run it
    after the timed steps, never inside one."""
    from tests.memory import TensorPeak  # imports torch alone: also in bench/.venv-trl011

    resident = live_tensor_mb()
    with TensorPeak() as tp:
        step()
    return resident + tp.peak / 2**20


def above(r: dict | None, peak: str = "peak_mb", base: str = "baseline_mb") -> float:
    """A child's peak above its baseline in MB; NaN for a configuration that was not measured."""
    return r[peak] - r[base] if r else NAN


def sps(r: dict | None) -> float:
    """Samples per second of a child's timed steps; NaN for a configuration that was not measured."""
    return r["samples_per_step"] / median(r["step_s"]) if r else NAN


# --------------------------------------------------------------------------- child processes


def emit(result: dict) -> None:
    """The one line a child answers with (its last line of stdout)."""
    print(RESULT_TAG + json.dumps(result), flush=True)


def child_env(extra: dict[str, str] | None = None) -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", **(extra or {}))
    return env


def run_child(cmd: list[str], timeout: int, log_name: str, env: dict[str, str] | None = None) -> dict:
    """Run a child command (`env`: variables added to its environment), keep its output under
    bench/.cache/logs, return its BENCH_RESULT dict."""
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=child_env(env), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        log = _log_path(log_name)
        log.write_text(f"$ {' '.join(cmd)}\n(timed out after {timeout} s)\n{e.stdout or ''}\n{e.stderr or ''}")
        raise BenchError(f"{log_name}: timed out after {timeout} s (log: {log.relative_to(REPO)})") from None
    return _child_result(cmd, log_name, proc.returncode, time.perf_counter() - t, proc.stdout, proc.stderr)


def _log_path(log_name: str) -> Path:
    logs = CACHE / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    return logs / f"{log_name}.log"


def _child_result(cmd: list[str], log_name: str, rc: int, seconds: float, stdout: str, stderr: str) -> dict:
    """Keep a finished child's output under bench/.cache/logs and return its BENCH_RESULT dict."""
    log = _log_path(log_name)
    log.write_text(f"$ {' '.join(cmd)}\n(exit {rc}, {seconds:.0f} s)\n--- stdout\n{stdout}\n--- stderr\n{stderr}")
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    last = [ln for ln in stderr.strip().splitlines() if ln.strip()][-1:] or ["no output"]
    raise BenchError(f"{log_name}: exit {rc}: {last[0][:300]} (log: {log.relative_to(REPO)})")


def turn_gate(lockstep: bool):
    """A child's wait for its turn before each step: with `lockstep` (its parent runs it beside other children,
    `run_lockstep`), it says it is ready on stdout and blocks, using no CPU, until the parent lets it go;
    otherwise it returns at once."""

    def wait() -> None:
        if lockstep:
            print(READY_TAG, flush=True)
            if not sys.stdin.readline():
                raise SystemExit("bench: the parent ended this child's turns")

    return wait


def run_lockstep(children: dict[str, tuple[list[str], str]], timeout: int) -> dict[str, dict | BenchError]:
    """Run the children ({key: (command, log name)}, each calling `turn_gate(True)` before every step) side by
    side, one step at a time: all load at once, then each step runs alone, the children taking turns in order and
    in the reverse order on every other cycle (A B, B A, A B, ...), so that the k-th steps of any two children
    are neighbours in time and a drift of the machine's speed reaches both alike. Returns each child's
    BENCH_RESULT dict, or the BenchError it ended with."""
    import queue
    import tempfile
    import threading

    deadline = time.perf_counter() + timeout
    procs, lines, out, err = {}, {}, {}, {}
    for key, (cmd, _) in children.items():
        err[key] = tempfile.TemporaryFile("w+")
        procs[key] = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=err[key], text=True, bufsize=1)
        lines[key], out[key] = queue.Queue(), []

        def read(stream=procs[key].stdout, q=lines[key]):
            for line in stream:
                q.put(line)
            q.put(None)

        threading.Thread(target=read, daemon=True).start()

    def ready(key: str) -> bool:
        """Wait for `key`'s next turn (True) or its exit (False)."""
        while True:
            try:
                line = lines[key].get(timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                raise TimeoutError from None
            if line is None:
                return False
            if line.rstrip("\n") == READY_TAG:
                return True
            out[key].append(line)

    t = time.perf_counter()
    alive = {}
    try:
        alive = {key: ready(key) for key in children}
        order = list(children)
        while any(alive.values()):
            for key in order:
                if alive[key]:
                    procs[key].stdin.write("go\n")
                    procs[key].stdin.flush()
                    alive[key] = ready(key)
            order.reverse()
    except TimeoutError:
        for proc in procs.values():
            proc.kill()
    results = {}
    for key, (cmd, log_name) in children.items():
        procs[key].wait()
        err[key].seek(0)
        stderr = err[key].read()
        err[key].close()
        if alive.get(key, True) and procs[key].returncode < 0:
            _log_path(log_name).write_text(f"$ {' '.join(cmd)}\n(timed out after {timeout} s)\n{''.join(out[key])}"
                                           f"\n{stderr}")
            results[key] = BenchError(f"{log_name}: timed out after {timeout} s")
            continue
        try:
            results[key] = _child_result(cmd, log_name, procs[key].returncode, time.perf_counter() - t,
                                         "".join(out[key]), stderr)
        except BenchError as e:
            results[key] = e
    return results


def bench_child_cmd(module: str, s: Settings, a: Assets | None = None, python=sys.executable, **config) -> list[str]:
    """The command of `python -m bench.<module> --child JSON` (this virtualenv's python unless given): `config`
    with the settings and assets."""
    config.update(settings=dataclasses.asdict(s), assets=a and dataclasses.asdict(a))
    return [str(python), "-m", f"bench.{module}", "--child", json.dumps(config)]


def run_bench_child(module: str, s: Settings, log_name: str, a: Assets | None = None, timeout: int | None = None,
                    python=sys.executable, env: dict[str, str] | None = None, **config) -> dict:
    """`python -m bench.<module> --child JSON` (this virtualenv's python unless given; `env` added to its
    environment): `config` with the settings and assets."""
    return run_child(bench_child_cmd(module, s, a, python, **config), timeout or s.child_timeout_s, log_name, env)


def run_children(module: str, s: Settings, a: Assets, configs: dict, notes: list[str]) -> dict:
    """Each of `configs` ({key: config}) in a child of its own (log `<module>-<key>`); one that fails is
    left out with a note and the others go on."""
    res = {}
    for key, config in configs.items():
        try:
            res[key] = run_bench_child(module, s, f"{module}-{key}", a, **config)
        except BenchError as e:
            notes.append(f"{key} failed: {e}")
    return res


def child_main(run_one) -> bool:
    """If argv is `--child JSON`, emit `run_one(settings, assets, config)`; True if it was a child."""
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        quiet()
        preload()
        config = json.loads(sys.argv[2])
        a = config.pop("assets")
        emit(run_one(Settings(**config.pop("settings")), a and Assets(**a), config))
        return True
    return False


# --------------------------------------------------------------------------- results


ROWS = {  # key: (module bench/<module>.py, title, target), in the order of RESULTS.md
    "memory": ("memory", "1. Memory with N policies", "N=4: marl <= 0.25x separate copies; each extra policy adds "
               "<= 5% of the base-alone peak"),
    "quantized": ("quantized", "2. Quantized base", "4-bit peak <= 0.45x full precision; step time <= 1.7x"),
    "rollouts": ("rollouts", "3. Rollouts, N=4", "mixed batch >= 2x faster than 4 sequential calls on a CPU; "
                 ">= 0.6*N x on a GPU"),
    "overhead": ("overhead", "4. Overhead", "PPO step <= 1.15x the sum of its bare passes; an adapter switch <= 1% "
                 "of a forward"),
    "peers": ("peers", "5. Peers", "at the same algorithm and settings: marl PPO >= 1.2x TRL 0.11.4's samples/s, "
              "marl GRPO >= 1.1x TRL GRPO + peft's (median of the rounds' ratios), each at no more peak memory than "
              "the peer"),
    "learning": ("learning", "6. Learning: shared base vs separate copies", "final rewards within seed noise "
                 "(abs(difference of means) < 2 standard errors)"),
    "multilora": ("multilora_step", "7. Batched multi-LoRA PPO step, N=4", "PPO step for 4 policies >= 1.5x faster "
                  "batched than with one pass per policy; no more peak memory than the per-policy path (issue 7)"),
    "scale": ("scale", "8. Scale: Qwen2.5-0.5B shape, 151,936-token vocabulary", "update peak <= 1.3x the same "
              "update with the loss on the hidden states; 4-bit <= 0.45x full precision; each extra policy <= 5% of "
              "the 1-policy peak (with adamw_8bit, issue 20); 4 policies on a 4-bit base <= 0.6x full precision "
              "(issue 20); vs peers (row 5's harness): memory <= theirs, PPO samples/s >= 1.2x TRL 0.11.4's, GRPO "
              ">= 1.1x TRL GRPO's"),
    "estimators": ("estimators", "9. Learning: critic-free estimators (GRPO, RLOO, REINFORCE++) against PPO at equal "
                   "samples", "GRPO and RLOO reach PPO's final reward: difference of means > -2 standard errors"),
    "gold": ("gold", "10. Gold reward against a proxy reward adapter (issue 11)", "the shipped defaults: gold reward "
             ">= sft + 1 sft std over 3 seeds, KL in its band, distinct-2 >= 0.8x sft's"),
    "population": ("population", "11. A sweep is one run: 8 configurations, successive halving and PBT against a "
                   "proxy reward (issue 20)", "B (the halving sweep)'s picked policy: gold reward >= A's (the "
                   "shipped defaults), held-out KL <= B's max_kl; B's wall time <= 0.5x C's (8 separate runs) and "
                   "<= 4x A's on this CPU; B's peak memory <= 1.5x A's (per-policy memory at the Qwen2.5-0.5B "
                   "shape: row 8)"),
}


@dataclass
class Row:
    """One row of the summary table, and its detail table; title and target from `ROWS`."""

    key: str
    measures: str  # what exactly is measured (one paragraph, markdown)
    result: str  # the headline ratio(s)
    meets: bool | None  # None: not measured / not decidable
    detail: str = ""  # a markdown table with every configuration
    notes: list[str] = field(default_factory=list)
    raw: dict = field(default_factory=dict)
    seconds: float = 0.0  # 0: run_all times the row
    title: str = ""
    target: str = ""

    def __post_init__(self):
        self.title = self.title or ROWS[self.key][1]
        self.target = self.target or ROWS[self.key][2]


def md_table(header: list[str], rows: list[list]) -> str:
    """A markdown table; numeric columns right-aligned, floats to 3 significant digits, NaN as n/a."""

    def cell(v):
        if isinstance(v, float):
            if v != v:
                return "n/a"
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v).replace("|", "\\|")

    def numeric(i):
        return all(isinstance(r[i], (int, float)) or r[i] == "" for r in rows) and rows

    align = [" ---: " if numeric(i) else " --- " for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def spread(xs, digits: int = 3) -> str:
    """The median of `xs` and its range, as '0.42 [0.40-0.45]' (3 significant digits); 'n/a' for none."""
    xs = [x for x in xs if x == x]
    if not xs:
        return "n/a"
    return f"{median(xs):.{digits}g} [{min(xs):.{digits}g}-{max(xs):.{digits}g}]"


def fx(v: float, digits: int = 2) -> str:
    """A ratio as '0.42x', or 'n/a' when it could not be measured."""
    return "n/a" if v != v else f"{v:.{digits}f}x"


def yes_no(ok: bool | None) -> str:
    return {True: "yes", False: "**no**", None: "n/a"}[ok]


def versions() -> dict[str, str]:
    out = {}
    for pkg in ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "datasets"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def machine() -> dict:
    """CPU model, cores, memory, GPU and library versions of this machine."""
    cpu = platform.processor() or "unknown"
    flags = ""
    try:
        info = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
        cpu = m.group(1).strip() if m else cpu
        f = re.search(r"^flags\s*:\s*(.+)$", info, re.M)
        flags = " ".join(x for x in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f and x in f.group(1).split())
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"cpu": cpu, "cpu_flags": flags, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "memory_gb": round(mem_gb, 1), "gpu": gpu, "python": platform.python_version(),
            "os": f"{platform.system()} {platform.release()}", **versions()}


def main(run_row, child) -> None:
    """A row module's entry point: `--child JSON` runs one configuration (see `child_main`);
    otherwise `[--quick]` measures the whole row and prints its tables."""
    if child_main(child):
        return
    ap = argparse.ArgumentParser(description=(run_row.__doc__ or "").split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, smoke test")
    args = ap.parse_args()
    s = settings(args.quick)
    row = run_row(s, ensure_assets(s))
    print(render_row(row))


def render_row(row: Row) -> str:
    notes = "".join(f"\n- {n}" for n in row.notes)
    return (f"### {row.title}\n\n{row.measures}\n\n{row.detail}\n\n**Result:** {row.result}. "
            f"**Target:** {row.target}. **Meets it:** {yes_no(row.meets)}.{notes}\n")
