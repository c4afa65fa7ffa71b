"""The run folder: adapters, manifest, metrics and checkpoints of one RLHF run.

```
RUN_DIR/
  manifest.json          base model name + fingerprint, stages done, configs used
  adapters/<name>/       peft format (+ value_head.safetensors, marl_adapter.json)
  checkpoints/<stage>/   resumable state (sft, reward: checkpoint-N/ with marl_checkpoint.json once complete)
  metrics.jsonl          one JSON object per logged step, the stage's config first
  logs/                  tensorboard
  .marl.lock             held by the one process writing the folder (`RunDir.writing`)
```
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import MarlError
from .io import atomic_write_json, read_json, recover_moved_aside

MANIFEST = "manifest.json"
LOCK_FILE = ".marl.lock"  # flock'ed by the process writing the run folder (RunDir.writing)
_HELD: dict[str, object] = {}  # run folders this process holds, by resolved path -> the open lock file
CHECKPOINT_DONE = "marl_checkpoint.json"  # written last into a Trainer checkpoint: it is complete
# Settings that do not change what a stage makes (where it runs, how it logs, how fast it goes):
# re-running a finished stage that differs from its recorded config only in these is "up to date".
NOT_COMPARED = frozenset({
    "run_dir", "overwrite", "resume", "report_to", "torch_threads", "logging_steps", "save_steps", "log_samples",
    "gradient_checkpointing", "forward_batch_size", "eval_batch_size", "update_pass_rows", "mixed_batch",
    "multi_lora", "reuse_first_forward", "stack_reference",
})


def _plain(value):
    return json.loads(json.dumps(value, default=str))


def config_differences(recorded: dict, cfg) -> dict[str, tuple]:
    """{key: (recorded, requested)} for the compared settings of dataclass config `cfg` that differ.

    A key the recorded config lacks (written by an older marl) counts as its default.
    """
    out = {}
    for f in dataclasses.fields(cfg):
        if f.name in NOT_COMPARED:
            continue
        new = _plain(getattr(cfg, f.name))
        if f.name in recorded:
            old = _plain(recorded[f.name])
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            old = _plain(default)
        if old != new:
            out[f.name] = (old, new)
    return out


def checkpoint_complete(folder: Path) -> bool:
    """A Trainer checkpoint is complete when its marker lists every file it holds at the size it has."""
    marker = folder / CHECKPOINT_DONE
    if not marker.exists():
        return False
    try:
        files = read_json(marker)["files"]
    except (MarlError, KeyError, TypeError):  # cut short or not marl's: not complete
        return False
    return all((folder / name).is_file() and (folder / name).stat().st_size == size for name, size in files.items())


def mark_checkpoint_complete(folder: Path, step: int) -> None:
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != CHECKPOINT_DONE}
    atomic_write_json(folder / CHECKPOINT_DONE, {"step": step, "files": files})


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise MarlError(f"{self.path} is a file, not a run folder: choose a folder (--run_dir)")
        for old in self.adapters.glob(".*.old"):  # an overwrite a kill cut between its two renames: put it back
            recover_moved_aside(self.adapters / old.name[1:-len(".old")])

    @contextlib.contextmanager
    def writing(self, stage: str, hold: bool = True) -> Iterator[None]:
        """Hold the run folder's lock for the body of the `with`: one writing process per run folder.

        A second `marl` process that would write the same folder exits in one line naming the process that
        holds it; readers (`marl eval`, `generate`) take no lock. The lock is an `flock` on RUN_DIR/.marl.lock,
        which the kernel releases when the holder exits, so a kill -9 leaves no stale lock. Nested holds in
        one process (a stage inside a pipeline) are one hold. `hold=False` (processes other than the main
        one, which write nothing) takes no lock.
        """
        key = str(self.path.resolve())
        if not hold or key in _HELD:
            yield
            return
        f = open(self.path / LOCK_FILE, "a+")  # noqa: SIM115 - held for the body of the `with`
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise MarlError(f"{self.path} is being written by {holder}: wait for it to finish, or give this run "
                            "another --run_dir") from None
        f.seek(0)
        f.truncate()
        f.write(f"`marl {stage}` (pid {os.getpid()})")
        f.flush()
        _HELD[key] = f
        try:
            yield
        finally:
            _HELD.pop(key).close()  # closing the file releases the lock

    def create(self) -> None:
        """Make the run folder before a stage loads anything, or say in one line why it cannot be made."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MarlError(f"cannot create the run folder {self.path} ({e.strerror or e}): choose a folder you "
                            "can write (--run_dir)") from e

    @property
    def adapters(self) -> Path:
        return self.path / "adapters"

    def adapter(self, name: str) -> Path:
        return self.adapters / name

    def checkpoints(self, stage: str) -> Path:
        return self.path / "checkpoints" / stage

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    def trainer_checkpoints(self, stage: str) -> tuple[list[Path], list[Path]]:
        """(complete, incomplete) checkpoint-N folders of a Trainer stage, oldest first."""
        folders = sorted((p for p in self.checkpoints(stage).glob("checkpoint-*")
                          if p.is_dir() and p.name.split("-")[-1].isdigit()), key=lambda p: int(p.name.split("-")[-1]))
        complete = [p for p in folders if checkpoint_complete(p)]
        return complete, [p for p in folders if p not in complete]

    def resumable(self, stage: str) -> Path | None:
        """The checkpoint `--resume true` would continue from, or None."""
        if stage == "ppo":
            latest = self.checkpoints("ppo") / "latest"
            return latest if (latest / "state.json").exists() else None
        complete, _ = self.trainer_checkpoints(stage)
        return complete[-1] if complete else None

    def adapter_names(self) -> list[str]:
        """The finished adapters; hidden folders are saves a kill cut short (`atomic_dir`'s temp and old)."""
        if not self.adapters.exists():
            return []
        return sorted(p.name for p in self.adapters.iterdir()
                      if not p.name.startswith(".") and (p / "adapter_config.json").exists())

    def manifest(self) -> dict:
        f = self.path / MANIFEST
        return read_json(f) if f.exists() else {}

    def check_base(self, base_name: str, fingerprint: str) -> None:
        """Refuse to mix bases within one run folder."""
        m = self.manifest()
        if m and m.get("base_fingerprint") != fingerprint:
            raise MarlError(
                f"{self.path} belongs to base {m.get('base_model')!r} (fingerprint {m.get('base_fingerprint')}), "
                f"not {base_name!r} ({fingerprint}): use --model_name_or_path {m.get('base_model')} or another run_dir"
            )

    def check_writable(self, adapter_name: str, overwrite: bool) -> None:
        """Fail before any training if the stage would replace a finished adapter."""
        if self.adapter(adapter_name).exists() and not overwrite:
            raise MarlError(f"{self.adapter(adapter_name)} already holds a finished adapter: pass --overwrite true "
                            "to replace it, or choose another --run_dir")

    def finished_results(self, stage: str, adapters: list[str], cfg) -> dict | None:
        """The recorded results when `stage` already made `adapters` with the same settings (skip it).

        None when there is something to train (no adapter yet, or `cfg.overwrite`, or `cfg.resume`
        with adapters saved but never recorded: the run stopped between the two, and the resumed
        stage saves them again). A finished adapter made with other settings, or not recorded in
        the manifest, is a `MarlError` naming the keys that differ and `--overwrite true`.
        """
        present = [a for a in adapters if self.adapter(a).exists()]
        if cfg.overwrite or not present:
            return None
        done = self.manifest().get("stages", {}).get(stage)
        if done is None and getattr(cfg, "resume", False):
            return None
        if done is None or len(present) < len(adapters):
            self.check_writable(present[0], overwrite=False)
        diff = config_differences(done.get("config") or {}, cfg)
        if diff:
            shown = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in list(diff.items())[:4])
            more = f" and {len(diff) - 4} more" if len(diff) > 4 else ""
            raise MarlError(f"{self.adapter(present[0])} already holds a finished {stage} adapter made with other "
                            f"settings ({shown}{more}): pass --overwrite true to train it again, or choose another "
                            "--run_dir")
        return done.get("results") or {}

    def record_stage(self, stage: str, base_name: str, fingerprint: str, config: dict, results: dict) -> None:
        m = self.manifest()
        m.update({"base_model": base_name, "base_fingerprint": fingerprint})
        m.setdefault("stages", {})[stage] = {"config": config, "results": results, "finished": time.time()}
        atomic_write_json(self.path / MANIFEST, m)

    def log_metrics(self, record: dict) -> None:
        """Append one JSON line to metrics.jsonl (appends of one short line are atomic enough).

        A last line cut short (a full disk, a kill) is ended first, so that this record stays whole.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_file, "a+b") as f:
            cut = False
            if f.seek(0, 2) > 0:
                f.seek(-1, 2)
                cut = f.read(1) != b"\n"
            f.write((b"\n" if cut else b"") + (json.dumps(record, default=float) + "\n").encode())

    def read_metrics(self, stage: str | None = None) -> list[dict]:
        if not self.metrics_file.exists():
            return []
        rows = []
        for line in self.metrics_file.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:  # blank, or a last line cut short by a full disk or a kill
                continue
        return [r for r in rows if stage is None or r.get("stage") == stage]
