"""Atomic writes: nothing half-written is ever left where a finished file belongs.

Everything lands through a temp file or folder and one rename, with the permissions the
user's umask gives: `tempfile` creates 600 / 700 and safetensors 0.8 writes 600 whatever the
umask (docs/known-issues.md #8), so modes are set from the umask before the rename.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any
from collections.abc import Iterator

import torch
from safetensors.torch import load_file, save_file

from .errors import MarlError, invalid_json


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask sets it to read it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike) -> None:
    """Give `path` (a file, or a folder and everything in it) the modes the umask gives new files."""
    mask = _umask()
    path = Path(path)
    if path.is_dir():
        for root, _dirs, files in os.walk(path):
            os.chmod(root, 0o777 & ~mask)
            for f in files:
                os.chmod(os.path.join(root, f), 0o666 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temp file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        apply_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """The JSON in `path`; one that does not parse (cut short, or edited by hand) is a one-line `MarlError`."""
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise invalid_json(path, e) from e


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> None:
    """Atomic safetensors save (contiguous CPU copies; no pickle)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
        apply_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file; a truncated or corrupt file is a one-line `MarlError`."""
    from safetensors import SafetensorError

    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise MarlError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0]}): it is truncated "
                        "or corrupt; save or download it again") from e


def moved_aside(final: Path) -> Path:
    """Where `atomic_dir` moves an existing folder while it puts the new one in place."""
    return final.with_name(f".{final.name}.old")


def recover_moved_aside(final: str | os.PathLike) -> bool:
    """Put back the folder an overwrite moved aside, when a kill or a power cut stopped it between
    its two renames (no `final`, only `.final.old`): nothing saved is lost. True if it did."""
    final = Path(final)
    old = moved_aside(final)
    if final.exists() or not old.is_dir():
        return False
    os.replace(old, final)
    return True


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside `final`; on success it replaces `final` in one rename.

    If the body raises, the temp folder is removed and `final` is untouched. With
    `overwrite`, an existing `final` is moved aside first and deleted only once the
    new folder is in place; an earlier overwrite cut between those two renames is
    undone first (`recover_moved_aside`).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_moved_aside(final)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        apply_umask(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        if not overwrite:
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(final)
        old = moved_aside(final)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
