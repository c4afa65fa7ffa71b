"""Every benchmark row (`bench.common.ROWS`), written to bench/RESULTS.md; `make bench` runs this (usage:
bench/README.md). Each row compares its configurations side by side in this one run and reports ratios;
every number in RESULTS.md comes from here. The raw measurements go beside it as JSON (RESULTS.json), so
rows can be re-measured one at a time. On a machine with a GPU the results go to bench/RESULTS-gpu.md.
"""

from __future__ import annotations

import argparse
import compileall
import dataclasses
import datetime as dt
import importlib
import json
import os
import shlex
import sys
import time
import traceback
from pathlib import Path

import torch

from bench.common import CACHE, REPO, ROWS, Row, Settings, ensure_assets, machine, md_table, render_row, settings, yes_no
from bench.scale import scale_settings


def run_row(key: str, s: Settings, assets) -> Row:
    t = time.perf_counter()
    try:
        row = importlib.import_module(f"bench.{ROWS[key][0]}").run(s, assets)
    except Exception as e:  # noqa: BLE001 - one broken row must not lose the others
        log = CACHE / "logs" / f"{key}-error.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(traceback.format_exc())
        row = Row(key, "", f"not measured: {type(e).__name__}: {str(e)[:300]} (traceback: "
                  f"{log.relative_to(REPO)})", None)
    row.seconds = row.seconds or time.perf_counter() - t  # a row rendered from an earlier measurement keeps its time
    return row


def _same_shape(old: dict, new: dict) -> bool:
    """Whether rows measured under settings `old` can stand beside rows measured under `new`: the
    same mode, model and PPO shapes. Knobs of a single row (its seeds, steps, rounds, budget; each
    row's own text states them) and settings the older run did not have yet do not count."""
    own = ("learning_", "multilora_", "child_timeout_s", "peer_rounds", "peer_steps", "ablation_steps")
    keys = {k for k in old.keys() & new.keys() if not k.startswith(own)}
    return bool(old) and all(old[k] == new[k] for k in keys)


def _command() -> str:
    argv = " ".join(shlex.quote(a) for a in sys.argv[1:])
    py = os.path.relpath(sys.executable, REPO) if sys.executable.startswith(str(REPO)) else sys.executable
    plain = f"{py} -m bench.run_all {argv}".strip()
    return f"make bench ARGS='{argv}'  (= {plain})" if os.environ.get("MAKELEVEL") and argv else \
        (f"make bench  (= {plain})" if os.environ.get("MAKELEVEL") else plain)


def render(store: dict, s: Settings, assets) -> str:
    rows = [store["rows"][k] for k in ROWS if k in store["rows"]]
    m = store["machine"]
    lines = [
        "# marl benchmarks",
        "",
        "Written by `bench/run_all.py`; every number below is produced by the scripts in `bench/` "
        "(rerun them rather than editing this file). Raw measurements: the JSON file beside this one.",
        "",
        "## Machine",
        "",
        md_table(["", ""], [
            ["CPU", f"{m['cpu']} ({m['cpu_flags']})"], ["cores", m["cores"]], ["torch threads", m["torch_threads"]],
            ["memory", f"{m['memory_gb']} GiB"], ["GPU", m["gpu"]], ["OS / Python", f"{m['os']} / {m['python']}"],
            *[[pkg, m[pkg]] for pkg in ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes")],
            ["TRL 0.11 peer (own venv)", store.get("trl011_versions", "not run")],
        ]),
        "",
        "## Command",
        "",
        f"`{store['command']}`, started {store['started']}. Rows measured in an earlier run of the same mode keep "
        "their own time in the summary.",
        "",
        "## Setup",
        "",
        f"- Model (rows 1-5): {s.describe_model()}, {assets.n_params / 1e6:.1f}M parameters in the decoder, float32, "
        "built in code, saved with `save_pretrained` and loaded with `from_pretrained`; reward adapter: a random "
        "SEQ_CLS LoRA with score head. Row 6 uses the embedded default model and a trained reward adapter.",
        f"- PPO shape: LoRA r={s.lora_r} (alpha {s.lora_alpha}) on all linear layers; {s.prompts_per_policy} prompts "
        f"per policy (<= {s.max_prompt_length} tokens, from the default corpus), {s.max_new_tokens} new tokens, "
        f"{s.ppo_epochs} PPO epochs of minibatch {s.mini_batch_size}; reference = the base with adapters disabled.",
        "- Memory is the peak of a fresh child process after its model is loaded (peak RSS, VmHWM, reset through "
        "/proc/self/clear_refs; on a GPU `torch.cuda.max_memory_allocated`). Ratios use the peak above the RSS the "
        "child had after importing its libraries (the CPU analogue of allocated GPU memory; raw RSS is shown too). "
        "Every model owns its weights: float weights that transformers leaves memory-mapped from the checkpoint "
        "are copied into the process after loading (`bench/common.py: own_weights`), as a GPU would hold them; "
        "left mapped, copies of one checkpoint would share page-cache pages that RSS still counts once per copy.",
        "- Times are medians; compared configurations within one process are timed alternately.",
        "",
        "## Summary",
        "",
        md_table(["row", "result", "target (issue 6; row 7: issue 7)", "marl meets it", "measured", "seconds",
                  "load avg before / after"],
                 [[r["title"], r["result"], r["target"], yes_no(r["meets"]), r["measured"], r["seconds"],
                   r.get("load", "")] for r in rows]),
        "",
        f"The load average (1 min) is that of the whole machine, on {m['cores']} cores: a value well above the "
        "benchmark's own use means other work shared the CPU and the times of that row are noisy.",
        "",
        "## Rows",
        "",
    ]
    for r in rows:
        fields = {f.name for f in dataclasses.fields(Row)}
        lines.append(render_row(Row(**{k: v for k, v in r.items() if k in fields})))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="marl benchmarks: writes bench/RESULTS.md")
    ap.add_argument("--quick", action="store_true", help="tiny model and shapes: a smoke test of every row")
    ap.add_argument("--only", default="", help=f"comma-separated rows to measure ({', '.join(ROWS)})")
    ap.add_argument("--skip", default="", help="comma-separated rows to leave out")
    ap.add_argument("--learning-budget-min", type=float, default=None,
                    help="row 6's time budget in minutes (full: 25, quick: 5); it stops and says so past it")
    ap.add_argument("--learning-seeds", type=int, default=None, help="row 6's number of seeds (full: 3, quick: 2)")
    ap.add_argument("--hidden", type=int, default=None, help="bench model hidden size (full: 512)")
    ap.add_argument("--layers", type=int, default=None, help="bench model layers (full: 8)")
    ap.add_argument("--heads", type=int, default=None, help="bench model attention heads (full: 8)")
    ap.add_argument("--model", choices=("llama", "qwen2.5-0.5b"), default="llama",
                    help="rows 1-5, 7: the bench Llama, or Qwen2.5-0.5B's shape (bench/scale.py; --quick: tiny Qwen2)")
    ap.add_argument("--render-only", action="store_true", help="measure nothing: write the results file again "
                    "from the JSON beside it (its settings, machine and command)")
    ap.add_argument("--out", default=None, help="results file (default bench/RESULTS.md; --quick: bench/.cache/"
                    "RESULTS-quick.md; with a GPU: bench/RESULTS-gpu.md)")
    args = ap.parse_args(argv)
    s = settings(args.quick)
    if args.learning_budget_min is not None:
        s.learning_budget_min = args.learning_budget_min
    if args.learning_seeds is not None:
        if args.learning_seeds < 2:
            ap.error("--learning-seeds must be >= 2 (standard errors need two seeds)")
        s.learning_seeds = tuple(range(args.learning_seeds))
    if args.model == "qwen2.5-0.5b":
        s = scale_settings(s, gpu=torch.cuda.is_available())
    for k in ("hidden", "layers", "heads"):
        if getattr(args, k) is not None:
            setattr(s, k, getattr(args, k))
    only = [r for r in args.only.split(",") if r]
    skip = [r for r in args.skip.split(",") if r]
    for r in only + skip:
        if r not in ROWS:
            ap.error(f"unknown row {r!r}: rows are {', '.join(ROWS)}")
    selected = [r for r in ROWS if (not only or r in only) and r not in skip]
    out = Path(args.out) if args.out else (CACHE / "RESULTS-quick.md" if args.quick else REPO / "bench" / (
        "RESULTS-gpu.md" if torch.cuda.is_available() else "RESULTS.md"))
    raw_file = out.with_suffix(".json")
    if args.render_only:
        if not raw_file.exists():
            ap.error(f"--render-only: {raw_file} does not exist: measure the rows first")
        store = json.loads(raw_file.read_text())
        s = Settings(**store["settings"])
        out.write_text(render(store, s, ensure_assets(s)))
        print(f"bench: wrote {out} from {raw_file}", flush=True)
        return 0

    for pkg in ("marl", "pipelines", "bench"):  # children then never compile while their memory is measured
        compileall.compile_dir(str(REPO / pkg), quiet=2)
    assets = ensure_assets(s)
    store = {"rows": {}}
    shape = json.loads(json.dumps(dataclasses.asdict(s)))
    if raw_file.exists():
        old = json.loads(raw_file.read_text())
        if _same_shape(old.get("settings", {}), shape):
            store = old  # same mode and shapes: keep the rows not re-measured now
    store.update(machine=machine(), command=_command(), settings=shape,
                 started=dt.datetime.now().isoformat(timespec="seconds"))
    print(f"bench: rows {', '.join(selected)} -> {out}", flush=True)
    for key in selected:
        print(f"bench: {key} ...", flush=True)
        load_before = os.getloadavg()[0]
        row = run_row(key, s, assets)
        d = dataclasses.asdict(row)
        d["measured"] = dt.datetime.now().isoformat(timespec="minutes")
        d["load"] = f"{load_before:.1f} / {os.getloadavg()[0]:.1f}"
        store["rows"][key] = d
        if key == "peers" and isinstance(row.raw.get("trl011"), dict):
            v = row.raw["trl011"].get("versions", {})
            store["trl011_versions"] = ", ".join(f"{k} {x}" for k, x in v.items())
        print(f"bench: {key}: {row.result} (target: {row.target}; meets: {yes_no(row.meets)}; "
              f"{row.seconds:.0f} s)", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        raw_file.write_text(json.dumps(store, indent=1, default=str))
        out.write_text(render(store, s, assets))  # after every row: an interrupted run keeps what it measured
    print(f"bench: wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
