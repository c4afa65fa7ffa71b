"""The run folder: adapters, manifest, metrics and checkpoints of one RLHF run.

```
RUN_DIR/
  manifest.json          base model name + fingerprint, stages done, configs used
  adapters/<name>/       peft format (+ value_head.safetensors, marl_adapter.json)
  checkpoints/<stage>/   resumable state
  metrics.jsonl          one JSON object per logged step, the stage's config first
  logs/                  tensorboard
```
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .errors import MarlError
from .io import atomic_write_json, read_json

MANIFEST = "manifest.json"


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

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

    def adapter_names(self) -> list[str]:
        if not self.adapters.exists():
            return []
        return sorted(p.name for p in self.adapters.iterdir() if (p / "adapter_config.json").exists())

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

    def record_stage(self, stage: str, base_name: str, fingerprint: str, config: dict, results: dict) -> None:
        m = self.manifest()
        m.update({"base_model": base_name, "base_fingerprint": fingerprint})
        m.setdefault("stages", {})[stage] = {"config": config, "results": results, "finished": time.time()}
        atomic_write_json(self.path / MANIFEST, m)

    def log_metrics(self, record: dict) -> None:
        """Append one JSON line to metrics.jsonl (appends of one short line are atomic enough)."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")

    def read_metrics(self, stage: str | None = None) -> list[dict]:
        if not self.metrics_file.exists():
            return []
        rows = [json.loads(line) for line in self.metrics_file.read_text().splitlines() if line.strip()]
        return [r for r in rows if stage is None or r.get("stage") == stage]
