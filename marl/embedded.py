"""The embedded models and datasets, by name: what `default` and `default-chat` mean wherever a model or a
dataset is named (`model_name_or_path`, `dataset_name`). Each is built offline on first use and cached
(marl.default: the text default; marl.default_chat: the instruct-style default)."""

from __future__ import annotations

from pathlib import Path

from .default import DEFAULT_DATASET, DEFAULT_MODEL, ensure_default_data, ensure_default_model
from .default_chat import CHAT_DATASET, CHAT_MODEL, ensure_chat_data, ensure_chat_model

MODELS = {DEFAULT_MODEL: ensure_default_model, CHAT_MODEL: ensure_chat_model}
DATASETS = {DEFAULT_DATASET: ensure_default_data, CHAT_DATASET: ensure_chat_data}


def resolve_model(name_or_path: str) -> str:
    """An embedded model's name (`default`, `default-chat`) -> its folder (built if needed); else unchanged."""
    return str(MODELS[name_or_path]()) if name_or_path in MODELS else name_or_path


def embedded_data(name: str) -> Path | None:
    """An embedded dataset's folder of `<stage>_<split>.jsonl` files (built if needed), or None for other names."""
    return DATASETS[name]() if name in DATASETS else None
