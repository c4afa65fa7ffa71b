"""What each extra policy costs on a CPU process's peak under other memory allocators, at row 8's shape
(Qwen2.5-0.5B, full precision, adamw_8bit):

    python -m bench.allocators [--quick] [--repeats 3]

Row 8 judges the per-policy memory on the step's tensors (what a GPU's max_memory_allocated counts); on a CPU
the process's peak (VmHWM) also holds what the allocator keeps after tensors are freed (docs/memory.md). Each
arm runs 1 and 4 policies, each in a fresh process of 4 PPO steps (bench.common.marl_trainer), the arms
interleaved, `--repeats` rounds:

- `glibc`: the default allocator;
- `glibc + malloc_trim`: glibc's `malloc_trim(0)` after every phase of the step (generation, score, reference,
  experience, update), which hands the heap's free pages back;
- `jemalloc`: jemalloc preloaded (`LD_PRELOAD`), when the machine has it (Debian: libjemalloc2).

Prints each process's peak above imports and its median step (the last 3), and each extra policy's share of
the one-policy peak (the means of the processes).
"""

from __future__ import annotations

import argparse
import ctypes
import time
from pathlib import Path

import torch

from bench.common import (
    Memory,
    child_main,
    ensure_assets,
    marl_trainer,
    md_table,
    median,
    ppo_args,
    run_bench_child,
    settings,
)
from bench.scale import scale_settings

JEMALLOC = Path("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
PHASES = (("trainer", "rollout"), ("trainer", "score"), ("rollout_module", "reference_logprobs"),
          ("learner", "make_experience"), ("learner", "update"))


def child(s, a, config: dict) -> dict:
    """`n` policies for 4 steps; with `trim`, malloc_trim(0) after every phase."""
    import marl.ppo.trainer as trainer_module

    mem = Memory()
    torch.manual_seed(0)
    _, trainer = marl_trainer(a, ppo_args(a, s, config["n"], prompts_per_policy=s.peer_batch, optim="adamw_8bit"))
    if config["trim"]:
        libc = ctypes.CDLL("libc.so.6")
        owners = {"trainer": trainer, "rollout_module": trainer_module, "learner": trainer.learner}
        for owner, name in PHASES:
            fn = getattr(owners[owner], name)

            def trimmed(*args, _fn=fn, **kw):
                out = _fn(*args, **kw)
                libc.malloc_trim(0)
                return out

            setattr(owners[owner], name, trimmed)
    mem.reset()
    steps = []
    for _ in range(4):
        t = time.perf_counter()
        trainer.step()
        steps.append(time.perf_counter() - t)
    maps = Path("/proc/self/maps").read_text() if Path("/proc/self/maps").exists() else ""
    return {"step_s": median(steps[1:]), "peak_mb": mem.peak_mb() - mem.baseline, "jemalloc": "jemalloc" in maps}


def arms() -> dict[str, dict]:
    """Each arm's child environment and settings."""
    out = {"glibc": ({}, False), "glibc + malloc_trim": ({}, True)}
    if JEMALLOC.exists():
        out["jemalloc"] = ({"LD_PRELOAD": str(JEMALLOC)}, False)
    return out


def main(argv: list[str] | None = None) -> int:
    if child_main(child):
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the tiny Qwen shape: a smoke test, the numbers say nothing")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of every arm (default 3)")
    args = ap.parse_args(argv)
    s = scale_settings(settings(args.quick))
    a = ensure_assets(s)
    runs: dict[tuple[str, int], list[dict]] = {}
    for r in range(args.repeats):
        for name, (env, trim) in arms().items():
            for n in (1, 4):
                res = run_bench_child("allocators", s, f"allocators-{name.replace(' ', '')}-{n}-{r}", a, env=env,
                                      n=n, trim=trim)
                if res["jemalloc"] != (name == "jemalloc"):
                    raise SystemExit(f"allocators: the {name} child ran {'with' if res['jemalloc'] else 'without'} "
                                     "jemalloc: check LD_PRELOAD")
                runs.setdefault((name, n), []).append(res)
                print(f"allocators: {name}, {n} polic{'y' if n == 1 else 'ies'}, round {r}: {res['peak_mb']:.0f} MB, "
                      f"{res['step_s']:.2f} s a step", flush=True)
    rows = []
    for name in arms():
        one, four = runs[(name, 1)], runs[(name, 4)]
        base = sum(x["peak_mb"] for x in one) / len(one)
        extra = (sum(x["peak_mb"] for x in four) / len(four) - base) / 3 / base
        rows.append([name, " / ".join(f"{x['peak_mb']:.0f}" for x in one), " / ".join(f"{x['step_s']:.2f}" for x in one),
                     " / ".join(f"{x['peak_mb']:.0f}" for x in four), " / ".join(f"{x['step_s']:.2f}" for x in four),
                     f"{extra:+.1%}"])
    print(md_table(["allocator", "1 policy: peak above imports (MB)", "1 policy: s a step",
                    "4 policies: peak above imports (MB)", "4 policies: s a step", "each extra policy"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
