"""Adapters from the Hugging Face Hub: `user/name[/subfolder][@revision]` ids, and fetching one.

`download_adapter` fetches only the adapter's json and safetensors files (never pickles);
`MultiAdapterModel.load_adapter` then applies the same checks as to a local folder (base
fingerprint, role, score head). Pushing adapters and their model cards is marl.hub.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import MarlError

# Hub names: letters, digits, '-', '_', '.'; not starting or ending with '-' or '.'; at most 96 characters.
_NAME = r"[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9_])?"
REPO_ID = re.compile(rf"^{_NAME}/{_NAME}$")


def parse_hub_adapter(spec: str) -> tuple[str, str | None, str | None]:
    """`user/name[/subfolder][@revision]` -> (repo_id, subfolder, revision)."""
    path, _, revision = spec.partition("@")
    parts = path.strip("/").split("/")
    repo_id, sub = "/".join(parts[:2]), "/".join(parts[2:]) or None
    return repo_id, sub, revision or None


def looks_like_hub_adapter(spec: str) -> bool:
    """A Hub adapter id rather than a (missing) local path.

    `user/name` always is one; a longer `user/name/subfolder` only when `user` is not a
    local folder, so that a mistyped local path still gets the "does not exist" error.
    """
    if spec.startswith((".", "/", "~")) or "\\" in spec:
        return False
    repo_id, sub, _ = parse_hub_adapter(spec)
    if not REPO_ID.match(repo_id):
        return False
    return sub is None or not Path(repo_id.split("/")[0]).exists()


def download_adapter(spec: str) -> Path:
    """Fetch a Hub adapter's json and safetensors files; returns the folder holding adapter_config.json."""
    from huggingface_hub import snapshot_download

    repo_id, sub, revision = parse_hub_adapter(spec)
    prefix = f"{sub}/" if sub else ""
    try:
        root = Path(snapshot_download(repo_id, revision=revision,
                                      allow_patterns=[f"{prefix}*.json", f"{prefix}*.safetensors"]))
    except Exception as e:  # noqa: BLE001 - any hub failure is one line for the user
        first = (str(e).strip().splitlines() or [""])[0]
        raise MarlError(f"adapter {spec!r} could not be fetched from the Hub: {e.__class__.__name__}: {first}") from e
    folder = root / sub if sub else root
    if not (folder / "adapter_config.json").exists():
        where = (f" in {sub}" if sub else "") + f" at revision {revision or 'main'}"
        raise MarlError(f"Hub repo {repo_id!r} has no adapter_config.json{where}: give the repo "
                        "(user/name, user/name/subfolder, ...@revision) of a pushed adapter")
    return folder
