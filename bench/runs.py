"""What the rows that train on the default task share (rows 6, 9, 10 and bench/kl_control.py): stage configs
from configs/*.yaml with `--key value` overrides, as a user gives them; adapters trained once and copied into
fresh run folders; the PPO metrics of a run (means with their standard errors: marl/stats.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from bench.common import REPO


def stage_config(stage: str, **over):
    """configs/<stage>.yaml (sft, reward or ppo) with `over` as command-line overrides, reporting to nothing."""
    from marl.config import PPOArgs, RewardArgs, SFTArgs, load_config

    args = {"sft": SFTArgs, "reward": RewardArgs, "ppo": PPOArgs}[stage]
    over = {"report_to": "none", **over}
    return load_config(args, str(REPO / "configs" / f"{stage}.yaml"), [f"--{k}={v}" for k, v in over.items()])


def ppo_config(run_dir: Path, policies: list[dict] | None = None, **over):
    """configs/ppo.yaml in `run_dir`, by default without samples in the log or checkpoints; `policies` replace
    its own."""
    if policies is not None:
        over["policies"] = json.dumps(policies)
    return stage_config("ppo", **{"run_dir": run_dir, "log_samples": 0, "save_steps": 10**6, **over})


def ensure_adapters(run_dir: Path, names=("sft", "reward"), **over) -> Path:
    """`run_dir` holding adapters `names` of the default task, each trained once by its stage (`over` on top)."""
    from marl.stages import reward, sft

    for name in names:
        if not (run_dir / "adapters" / name / "adapter_config.json").exists():
            {"sft": sft.run, "reward": reward.run}[name](stage_config(name, run_dir=run_dir, **over))
    return run_dir


def copy_adapters(src: Path, dst: Path, names=("sft", "reward"), fresh: bool = True) -> None:
    """Copy `src`'s adapters `names` into `dst`; `fresh`: into a new, empty run folder with `src`'s manifest."""
    if fresh:
        if dst.exists():
            shutil.rmtree(dst)
        (dst / "adapters").mkdir(parents=True)
        if (src / "manifest.json").exists():
            shutil.copy(src / "manifest.json", dst / "manifest.json")
    for n in names:
        shutil.copytree(src / "adapters" / n, dst / "adapters" / n)


def ppo_records(run_dir: Path) -> list[dict]:
    """The per-iteration PPO metrics of a run (metrics.jsonl)."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in rows if r.get("stage") == "ppo" and "step" in r]


def second_half(records: list[dict], name: str, key: str = "kl/mean") -> float:
    """Policy `name`'s mean `key` over the second half of `records`."""
    half = [r[f"{name}/{key}"] for r in records][len(records) // 2:]
    return sum(half) / len(half)
