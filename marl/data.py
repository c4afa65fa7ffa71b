"""Loading and validating the dataset of each stage.

Sources: `default` or `default-chat` (the embedded corpus, as text or as conversations), a local json / jsonl / csv / parquet file
or a folder of them, or a Hub dataset id. Formats are TRL's standard ones:

- sft:    `text`, or `messages`, or `prompt` + `completion`
- reward: `chosen` + `rejected`, with or without a `prompt`
- ppo:    `prompt` (text or messages); a `text` column is cut to its first words
"""

from __future__ import annotations

import logging
from pathlib import Path

from .embedded import embedded_data
from .errors import MarlError

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
DEFAULT_FILES = {"sft": "sft", "reward": "reward", "ppo": "prompts"}
STAGE_COLUMNS = {
    "sft": [("text",), ("messages",), ("prompt", "completion")],
    "reward": [("chosen", "rejected")],
    "ppo": [("prompt",), ("text",)],
}


def load_split(dataset_name: str, split: str, stage: str, dataset_config: str | None = None,
               text_field: str | None = None):
    """Load one split of a stage's dataset and check it has the columns the stage needs.

    Returns a `datasets.Dataset`, or None when the split does not exist (so the caller
    can hold out part of train instead).
    """
    import datasets

    datasets.disable_progress_bars()
    embedded = embedded_data(dataset_name)  # `default`, `default-chat`
    if embedded is not None:
        path = embedded / f"{DEFAULT_FILES[stage]}_{split}.jsonl"
        if not path.exists():
            return None
        ds = datasets.load_dataset("json", data_files=str(path), split="train")
    else:
        p = Path(dataset_name).expanduser()
        if p.suffix in LOCAL_FORMATS or dataset_name.startswith((".", "/", "~")):
            if not p.exists():
                raise MarlError(f"dataset file {dataset_name} does not exist: give a json/jsonl/csv/parquet file, "
                                "a folder, a Hub id, or `default`")
            if p.is_file():
                if p.suffix not in LOCAL_FORMATS:
                    raise MarlError(f"dataset file {p} has an unknown format: use .json, .jsonl, .csv or .parquet")
                if split != "train":
                    return None
                if p.stat().st_size == 0:
                    raise MarlError(f"dataset {dataset_name!r} is empty: give a dataset with rows")
                ds = _load_local_file(p, dataset_name)
            else:
                ds = _load_hub_or_folder(str(p), dataset_config, split)
        else:
            ds = _load_hub_or_folder(dataset_name, dataset_config, split)
        if ds is None:
            return None
    validate_columns(ds, stage, dataset_name, text_field)
    if len(ds) == 0:
        raise MarlError(f"dataset {dataset_name!r} split {split!r} is empty: give a dataset with rows")
    return ds


def _load_local_file(p: Path, dataset_name: str):
    """One local json/jsonl/csv/parquet file as a Dataset; what datasets raises for a bad file, in one line."""
    import datasets
    from datasets.exceptions import DatasetGenerationError

    log = logging.getLogger("datasets")  # it logs the parse error too; the MarlError below is the one line
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        return datasets.load_dataset(LOCAL_FORMATS[p.suffix], data_files=str(p), split="train")
    except StopIteration:  # datasets 5 on a json file with no rows (docs/known-issues.md #10)
        raise MarlError(f"dataset {dataset_name!r} is empty: give a dataset with rows") from None
    except DatasetGenerationError as e:
        raise MarlError(_unreadable(p, e)) from None
    except ValueError as e:  # datasets' way of saying the file has no rows
        if "no data" in str(e):
            raise MarlError(f"dataset {dataset_name!r} is empty: give a dataset with rows") from None
        raise MarlError(f"dataset file {p} could not be read: {str(e).splitlines()[0]}") from None
    finally:
        log.setLevel(level)


def _unreadable(where, e: Exception) -> str:
    """The one-line message for a file datasets failed to parse (the cause is on __cause__)."""
    cause = e.__cause__ or e.__context__ or e
    if isinstance(cause, UnicodeDecodeError):
        return (f"dataset file {where} is not valid UTF-8 (byte {cause.start}: {cause.reason}): save it as UTF-8, "
                "e.g. iconv -f latin1 -t utf-8")
    return f"dataset file {where} could not be read ({cause.__class__.__name__}: {str(cause).splitlines()[0]}): " \
           "check that it is valid json/jsonl/csv/parquet"


def _load_hub_or_folder(name: str, config: str | None, split: str):
    import datasets
    from datasets.exceptions import DatasetGenerationError

    try:
        return datasets.load_dataset(name, config, split=split)
    except StopIteration:
        raise MarlError(f"dataset {name!r} is empty: give a dataset with rows") from None
    except DatasetGenerationError as e:
        raise MarlError(_unreadable(name, e)) from None
    except ValueError as e:  # the split does not exist
        if "split" in str(e).lower() or "Unknown split" in str(e):
            return None
        raise MarlError(f"dataset {name!r} could not be loaded: {str(e).splitlines()[0]}") from e
    except FileNotFoundError as e:
        raise MarlError(f"dataset {name!r} not found locally or on the Hub: check the name (offline: give a local "
                        "file)") from e
    except Exception as e:  # noqa: BLE001 - connection errors and the like, in one line
        raise MarlError(f"dataset {name!r} could not be loaded ({e.__class__.__name__}): check the name and network, "
                        "or give a local file") from e


def validate_columns(ds, stage: str, dataset_name: str, text_field: str | None = None) -> None:
    cols = set(ds.column_names)
    options = list(STAGE_COLUMNS[stage])
    if text_field:  # TRL reads plain text from this column only
        options = [(text_field,) if opt == ("text",) else opt for opt in options]
    for opt in options:
        if set(opt) <= cols:
            _check_values(ds, opt, stage, dataset_name)
            return
    wanted = " or ".join("+".join(opt) for opt in options)
    raise MarlError(f"dataset {dataset_name!r} has columns {sorted(cols)} but `marl {stage}` needs {wanted}: "
                    "rename the columns or pick another dataset")


def _check_values(ds, columns: tuple[str, ...], stage: str, dataset_name: str) -> None:
    """Refuse values TRL would fail on deep inside: a column of the wrong type (numbers for text), and in
    sft and reward a missing value (ppo's `prompt_texts` skips rows without a prompt). Read from the Arrow
    schema and null counts, without reading the rows."""
    for c in columns:
        kind = ds.data.schema.field(c).type
        chat = c in ("messages", "prompt", "completion", "chosen", "rejected")  # TRL's conversational columns
        if not ((_is_text(kind) and c != "messages") or (chat and _is_messages(kind)) or str(kind) == "null"):
            want = "a list of {role, content} messages" if c == "messages" else \
                "text (or a list of {role, content} messages)" if chat else "text"
            raise MarlError(f"dataset {dataset_name!r}: column {c!r} holds {kind} values, `marl {stage}` needs {want}: "
                            "convert the column or pick another dataset")
        missing = ds.data.column(c).null_count
        if missing and stage != "ppo":
            raise MarlError(f"dataset {dataset_name!r}: {missing} of {len(ds)} rows have no {c!r}: fill those rows or "
                            "remove them")


def is_conversational(ds) -> bool:
    """Whether a dataset holds conversations (TRL's conversational format: a column of {role, content} lists)."""
    return any(_is_messages(ds.data.schema.field(c).type) for c in ds.column_names
               if c in ("messages", "prompt", "completion", "chosen", "rejected"))


def check_chat_template(ds, tokenizer, dataset_name: str) -> None:
    """One line for a conversational dataset whose tokenizer has no chat template to format it with."""
    if ds is not None and not tokenizer.chat_template and is_conversational(ds):
        raise MarlError(f"dataset {dataset_name!r} holds conversations (lists of messages) but the tokenizer has no "
                        "chat template: set chat_template (chatml, or a .jinja file), or give text data")


def _is_text(kind) -> bool:
    import pyarrow as pa

    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _is_messages(kind) -> bool:
    import pyarrow as pa

    return ((pa.types.is_list(kind) or pa.types.is_large_list(kind)) and pa.types.is_struct(kind.value_type)
            and {"role", "content"} <= {f.name for f in kind.value_type})


def train_eval_splits(cfg, stage: str, text_field: str | None = None):
    """(train, eval) datasets for a stage config; eval is held out of train if the data has no eval split."""
    train = load_split(cfg.dataset_name, cfg.train_split, stage, cfg.dataset_config, text_field)
    if train is None:
        raise MarlError(f"dataset {cfg.dataset_name!r} has no split {cfg.train_split!r}: set --train_split")
    eval_ds = load_split(cfg.dataset_name, cfg.eval_split, stage, cfg.dataset_config, text_field)
    if eval_ds is None and cfg.eval_fraction > 0 and len(train) >= 2:
        parts = train.train_test_split(test_size=cfg.eval_fraction, seed=cfg.seed)
        train, eval_ds = parts["train"], parts["test"]
    if cfg.max_train_samples is not None:
        train = train.select(range(min(cfg.max_train_samples, len(train))))
    return train, eval_ds


def prompt_texts(ds, tokenizer, max_words: int = 8) -> list:
    """PPO prompts from a dataset: the `prompt` column, or a `text` column cut to its first words."""
    if "prompt" in ds.column_names:
        return list(ds["prompt"])
    return [" ".join(t.split()[:max_words]) for t in ds["text"]]
