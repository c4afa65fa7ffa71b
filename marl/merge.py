"""Fuse one adapter into its base: a plain transformers model that loads without peft.

Policies and the sft adapter become an `AutoModelForCausalLM` (a policy's value head
is a training-time critic and is not part of it); the reward adapter becomes an
`AutoModelForSequenceClassification` with its score head (num_labels=1). The base is
always loaded in full precision for the merge: LoRA deltas cannot be added to 4-bit
or 8-bit weights without rounding them away, so a quantized base is dequantized by
loading its original checkpoint in float32.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .embedded import resolve_model
from .errors import MarlError
from .io import atomic_dir, atomic_write_json, read_json
from .model import ADAPTER_META, base_fingerprint, load_base, load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def merge_adapter(adapter_dir: str | Path, base_name: str, out: str | Path, *, dtype: str = "float32",
                  overwrite: bool = False, trust_remote_code: bool = False, log=print) -> Path:
    """Merge the adapter in `adapter_dir` into base `base_name` and save model + tokenizer to `out`, atomically."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification


    adapter_dir, out = Path(adapter_dir), Path(out)
    if dtype not in DTYPES:
        raise MarlError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    if out.exists() and not overwrite:
        raise MarlError(f"{out} already exists: pass --overwrite to replace it, or choose another --out")
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.exists():
        raise MarlError(f"{adapter_dir} has no adapter_model.safetensors: only safetensors adapters are merged")
    meta = read_json(adapter_dir / ADAPTER_META) if (adapter_dir / ADAPTER_META).exists() else {}
    role = meta.get("role", "policy")
    if role == "reward" and not _has_score_head(weights):
        raise MarlError(f"reward adapter {adapter_dir} has no score head: train it with `marl reward`")
    path = resolve_model(base_name)
    fp = meta.get("base_fingerprint")
    if fp is not None and fp != base_fingerprint(path):
        raise MarlError(f"adapter {adapter_dir} was trained on base {meta.get('base_model')!r} (fingerprint {fp}), "
                        f"not on {base_name!r}: merge it into the base it was trained on")

    log(f"merge: loading base {base_name} in float32")
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    extra = dict(model_class=AutoModelForSequenceClassification, num_labels=1) if role == "reward" else \
        dict(model_class=AutoModelForCausalLM)
    try:
        base = load_base(path, quantization="none", trust_remote_code=trust_remote_code, **extra)
    except OSError as e:  # a Hub id that is neither cached nor reachable
        raise MarlError(f"base model {base_name!r} could not be loaded: {(str(e).splitlines() or [''])[0]}") from e
    base.config.pad_token_id = tokenizer.pad_token_id  # sequence classification finds the last token by it
    log(f"merge: merging {role} adapter {adapter_dir.name} (peft merge_and_unload)")
    peft_model = PeftModel.from_pretrained(base, str(adapter_dir))
    merged = peft_model.merge_and_unload().to(DTYPES[dtype])
    merged.eval()
    with atomic_dir(out, overwrite=overwrite) as tmp:
        merged.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        atomic_write_json(tmp / "marl_merged.json", {
            "adapter": meta.get("name", adapter_dir.name), "role": role, "base_model": meta.get("base_model", base_name),
            "base_fingerprint": fp, "dtype": dtype,
            "model_class": type(merged).__name__,
            "note": "value head not included (PPO critic only)" if role == "policy" else None,
        })
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log(f"merge: wrote {out} ({size / 1e6:.1f} MB, {type(merged).__name__}, {dtype}); "
        f"load it with transformers' from_pretrained, no peft needed")
    return out


def _has_score_head(weights: Path) -> bool:
    """Whether the adapter file holds a score head (else peft would merge a random one)."""
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        return any(".score." in k or k.startswith("score.") for k in f.keys())
