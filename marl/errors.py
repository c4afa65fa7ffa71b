"""The one exception type marl raises for bad user input, and the environment errors it stands for.

The CLI turns a `MarlError` into a one-line message and exit code 2. Errors the
environment causes (a full disk, a folder without write permission, out of memory)
arrive as the dependencies' own exceptions; `from_environment` turns them into a
`MarlError` at the CLI boundary. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import re
from pathlib import Path


class MarlError(Exception):
    """Bad input: the message names the problem and how to fix it, in one line."""


DISK_FULL = "no space left on device"
# torch.save's zip writer reports a full disk without an errno (docs/known-issues.md #9)
_DISK_FULL_TEXTS = ("no space left on device", "file write failed", "unexpected pos", "pytorchstreamwriter",
                    "storagefull", "code: 28,", "disk quota exceeded")


# Rust bindings (tokenizers, safetensors) raise io errors as plain exceptions with the errno in the text
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def _where(e: BaseException) -> str:
    name = getattr(e, "filename", None)
    return f" ({name})" if name else ""


def from_environment(e: BaseException, fix_hint: str = "") -> MarlError | None:
    """A one-line `MarlError` for an exception the machine caused, or None (a bug: keep the traceback).

    `fix_hint` is appended to disk-full messages (the CLI passes how to resume, when it can).
    """
    text = str(e).lower()
    code = getattr(e, "errno", None)
    if code is None and (found := _RUST_OS_ERROR.search(text)):
        code = int(found.group(1))
    if code in (errno.ENOSPC, errno.EDQUOT) or (
            isinstance(e, (OSError, RuntimeError)) or type(e).__name__ == "SafetensorError") and any(
            t in text for t in _DISK_FULL_TEXTS):
        return MarlError(f"{DISK_FULL} while writing{_where(e)}: free some space or choose a --run_dir on "
                         f"another disk{fix_hint}; files saved before are kept")
    if isinstance(e, PermissionError) or code in (errno.EACCES, errno.EPERM):
        return MarlError(f"permission denied{_where(e)}: fix the permissions or choose a --run_dir you can "
                         "write to")
    if code == errno.EROFS:
        return MarlError(f"read-only file system{_where(e)}: choose a --run_dir on a writable disk")
    if code == errno.EEXIST and e.filename and Path(e.filename).exists() and not Path(e.filename).is_dir():
        return MarlError(f"{e.filename} is a file where a folder is needed: choose another path (--run_dir, --out, "
                         "--output)")
    if code == errno.ENOTDIR:
        return MarlError(f"not a folder{_where(e)}: a path given as a folder (--run_dir, --out) names a file or runs "
                         "through one; choose a folder")
    if code == errno.EISDIR:
        return MarlError(f"is a folder{_where(e)}: a path given as a file names a folder; give a file")
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return MarlError("out of memory: lower the batch sizes (per_device_train_batch_size, mini_batch_size, "
                         "forward_batch_size), max_length, or load the base with --quantization 4bit")
    return None


def invalid_json(path, e) -> MarlError:
    """The one line for a JSON file that does not parse (`e`: its `json.JSONDecodeError`)."""
    return MarlError(f"{path} is not valid JSON ({e.msg}, line {e.lineno} column {e.colno}): it was cut short or "
                     "edited; restore it or save it again")


def _json_file(e: BaseException) -> str | None:
    """The .json file a dependency was reading when it raised `e`: the deepest frame naming an existing one."""
    found, tb = None, e.__traceback__
    while tb is not None:
        for value in tb.tb_frame.f_locals.values():
            if isinstance(value, (str, Path)) and str(value).endswith(".json") and len(str(value)) < 4096 \
                    and Path(value).is_file():
                found = str(value)
        tb = tb.tb_next
    return found


# dependency exceptions that mean a bad setting or input: (class name, text in the first line of the message,
# what to say, how to fix it); by name, as importing the classes would load the libraries. An empty "what" keeps
# the first line.
_BAD_INPUT = [
    ("NoMatchingPeftModuleError", "", "", "set --lora_target_modules to module names of this base, or all-linear"),
    ("ValueError", "Couldn't instantiate the backend tokenizer",  # transformers, a folder without tokenizer.json
     "the model's tokenizer could not be loaded (no tokenizer.json, and no sentencepiece or tiktoken to convert "
     "a slow one)", "copy the base model's tokenizer files into its folder, or pip install sentencepiece"),
    ("ValueError", "Transformers does not recognize this architecture", "",  # an unknown model_type
     "pip install -U transformers, or check model_type in the model's config.json"),
    ("ValueError", "contains custom code which must be executed", "",  # config.json with an auto_map
     "pass --trust_remote_code true if you trust that code"),
]


def from_dependency(e: BaseException) -> MarlError | None:
    """A one-line `MarlError` for a dependency's exception that a setting or an input caused, or None."""
    import json

    if isinstance(e, json.JSONDecodeError):  # e.g. peft reading a cut adapter_config.json
        return invalid_json(_json_file(e) or "a JSON file (--debug shows which)", e)
    first = (str(e).strip().splitlines() or [""])[0]
    for name, start, what, fix in _BAD_INPUT:
        if type(e).__name__ == name and start in first:
            return MarlError(f"{what or first.rstrip(' .')}: {fix}")
    return None


def close_progress_bars() -> None:
    """Close every live tqdm bar, so that nothing redraws after the error line."""
    try:
        from tqdm import std
    except ImportError:  # pragma: no cover - tqdm comes with transformers
        return
    for bar in list(getattr(std.tqdm, "_instances", ())):
        try:
            bar.close()
        except Exception:  # noqa: BLE001 - a bar that cannot close must not hide the error
            pass
