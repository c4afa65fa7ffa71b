"""Adapters to and from the Hugging Face Hub, through huggingface_hub.

Push: `plan_push` lists exactly which local file goes to which repo and path (what
`marl push --dry-run` prints), `push` uploads that plan with `HfApi.create_repo` +
`create_commit`. Every adapter gets a generated model card (README.md) naming the
base model, the role, the training config and the final metrics.

Pull: marl.hub_download (apart from here, so that loading a model never reaches the run folder).

The token comes from `HF_TOKEN` or the login cache (`huggingface_hub.get_token`). It is
passed to the client and nowhere else: never printed, logged or put in a message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import MarlError
from .hub_download import REPO_ID
from .io import read_json
from .run import RunDir

ADAPTER_META = "marl_adapter.json"  # same as marl.model_io.ADAPTER_META (not imported: that pulls in torch)
CARD = "README.md"
ROLE_TEXT = {
    "sft": "the supervised fine-tuned policy (stage 1); the reference policy of PPO",
    "reward": "the reward model (stage 2): LoRA + a scalar score head",
    "policy": "a PPO policy (stage 3): LoRA (+ its value head, unless it trained with a separate critic)",
}
FILE_TEXT = {
    "adapter_config.json": "peft LoRA config",
    "adapter_model.safetensors": "LoRA weights",
    "value_head.safetensors": "value head (PPO critic)",
    ADAPTER_META: "marl metadata: name, role, base model and fingerprint",
}


# --------------------------------------------------------------------------- plan


@dataclass
class Upload:
    """One file of a push: a local file, or generated text (`data`), and where it goes."""

    path_in_repo: str
    local: Path | None = None
    data: bytes | None = None

    @property
    def size(self) -> int:
        return len(self.data) if self.data is not None else self.local.stat().st_size

    @property
    def source(self) -> str:
        return str(self.local) if self.local is not None else "(generated model card)"


@dataclass
class RepoPlan:
    """Everything one repo receives in one commit."""

    repo_id: str
    adapters: list[str]
    files: list[Upload] = field(default_factory=list)


def check_repo_id(repo_id: str) -> str:
    if not REPO_ID.match(repo_id or ""):
        raise MarlError(f"--repo-id {repo_id!r} is not USER/NAME: give your Hub user or organisation and a repo "
                        "name, e.g. --repo-id alice/marl-policy")
    return repo_id


def plan_push(run: RunDir, adapters: list[str], repo_id: str, subfolders: bool = False,
              revision: str | None = None) -> list[RepoPlan]:
    """Which local files go to which repo and path.

    One adapter: `repo_id`. Several: one repo each (`repo_id-<adapter>`), or with
    `subfolders` one repo with a folder per adapter and an index README at the root.
    A README.md already in an adapter folder (TRL writes one) is replaced by ours.
    """
    check_repo_id(repo_id)
    adapters = list(dict.fromkeys(adapters))
    manifest = run.manifest()
    plans: dict[str, RepoPlan] = {}
    for name in adapters:
        folder = run.adapter(name)
        if subfolders:
            target, prefix = repo_id, f"{name}/"
        else:
            target, prefix = (repo_id if len(adapters) == 1 else f"{repo_id}-{name}"), ""
        check_repo_id(target)
        plan = plans.setdefault(target, RepoPlan(target, []))
        plan.adapters.append(name)
        for f in sorted(folder.iterdir()):
            if f.is_file() and not f.name.startswith(".") and f.name != CARD:
                plan.files.append(Upload(prefix + f.name, local=f))
        meta = read_json(folder / ADAPTER_META) if (folder / ADAPTER_META).exists() else {}
        card = model_card(name, meta, manifest, target, subfolder=name if subfolders else None, revision=revision,
                          files=[f.path_in_repo[len(prefix):] for f in plan.files if f.path_in_repo.startswith(prefix)])
        plan.files.append(Upload(prefix + CARD, data=card.encode()))
    if subfolders:
        plan = plans[repo_id]
        plan.files.append(Upload(CARD, data=index_card(repo_id, plan.adapters, run, manifest).encode()))
    return list(plans.values())


def describe_plan(plans: list[RepoPlan], private: bool, revision: str | None) -> str:
    lines = []
    for plan in plans:
        total = sum(f.size for f in plan.files)
        visibility = "private" if private else "visibility: the namespace default, usually public"
        lines.append(f"{plan.repo_id} (model repo, {visibility}, revision "
                     f"{revision or 'main'}): {len(plan.files)} files, {_bytes(total)}")
        width = max(len(f.source) for f in plan.files)
        for f in plan.files:
            lines.append(f"  {f.source:<{width}}  ->  {plan.repo_id}/{f.path_in_repo}  ({_bytes(f.size)})")
    return "\n".join(lines)


def _bytes(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


# --------------------------------------------------------------------------- model cards


def _hub_model_id(name: str) -> bool:
    """Whether a base model name is a Hub id (the card's `base_model:` must be one)."""
    return bool(REPO_ID.match(name)) and not Path(name).expanduser().exists()


def _is_local_path(value: str) -> bool:
    return value.startswith(("/", "~", "./", "../")) or bool(re.match(r"^[A-Za-z]:[\\/]", value))


def public(value):
    """`value` fit for a public card: local paths (the training machine's folders) cut to their last part."""
    if isinstance(value, dict):
        return {k: public(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [public(v) for v in value]
    if isinstance(value, str) and _is_local_path(value):
        return "<local>/" + re.split(r"[\\/]", value.rstrip("/\\"))[-1]
    return value


def _shown_base(base: str) -> str:
    return base if base == "default" or _hub_model_id(base) else public(base)


def _stage_of(name: str, meta: dict) -> str:
    return meta.get("stage") or {"sft": "sft", "reward": "reward"}.get(meta.get("role", ""), "ppo")


def _metrics(name: str, meta: dict, manifest: dict) -> dict:
    """The adapter's final numbers: its stage's results (its own row for ppo) and its held-out eval."""
    results = (manifest.get("stages", {}).get(_stage_of(name, meta)) or {}).get("results") or {}
    if isinstance(results.get(name), dict):  # ppo: one entry per policy
        results = {**results[name], **({"train_seconds": results["train_seconds"]}
                                       if "train_seconds" in results else {})}
    out = {k: v for k, v in results.items() if isinstance(v, (int, float, str))}
    for k, v in (meta.get("results") or {}).items():
        if isinstance(v, (int, float)) and k not in out:
            out[f"held_out/{k}"] = v
    return out


def model_card(name: str, meta: dict, manifest: dict, repo_id: str, subfolder: str | None = None,
               revision: str | None = None, files: list[str] | None = None) -> str:
    """README.md for one adapter: front matter for the Hub, then what it is, how to load it,
    the training config and the final metrics."""
    role = meta.get("role", "policy")
    base = meta.get("base_model") or manifest.get("base_model") or "unknown"
    shown = _shown_base(base)
    fingerprint = meta.get("base_fingerprint") or manifest.get("base_fingerprint") or "unknown"
    stage = _stage_of(name, meta)
    config = public((manifest.get("stages", {}).get(stage) or {}).get("config") or {})
    front = {"library_name": "peft", "tags": ["marl", "peft", "lora", "rlhf", role],
             "pipeline_tag": "text-classification" if role == "reward" else "text-generation"}
    if _hub_model_id(base):
        front["base_model"] = base
    revision = None if revision in (None, "main") else revision
    hub_id = (f"{repo_id}/{subfolder}" if subfolder else repo_id) + (f"@{revision}" if revision else "")
    sub_arg = (f', subfolder="{subfolder}"' if subfolder else "") + (f', revision="{revision}"' if revision else "")
    role_arg = ', role="reward"' if role == "reward" else ""
    base_note = (" (marl's embedded tiny model, built offline by `marl`)" if base == "default" else
                 "" if _hub_model_id(base) else " (a local model folder of the training machine)")
    auto = "AutoModelForSequenceClassification" if role == "reward" else "AutoModelForCausalLM"
    extra = ", num_labels=1" if role == "reward" else ""
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# {hub_id}: `{name}` ({role} adapter)", "",
        f"A LoRA adapter trained with `marl` (multi-adapter RLHF: every role a LoRA adapter on one shared base). "
        f"Role: {ROLE_TEXT.get(role, role)}.", "",
        "| | |", "| --- | --- |",
        f"| role | `{role}` |",
        f"| base model | `{shown}`{base_note} |",
        f"| base fingerprint | `{fingerprint}` (marl refuses to load this adapter onto another base) |",
        f"| training stage | `marl {stage}` |",
    ]
    if config.get("lora_r") is not None:
        lines.append(f"| LoRA | r={config.get('lora_r')}, alpha={config.get('lora_alpha')}, "
                     f"targets {config.get('lora_target_modules')} |")
    if config.get("quantization") not in (None, "none"):
        lines.append(f"| base loaded as | {config['quantization']} |")
    for f in files or []:
        what = "LoRA weights + score head" if role == "reward" and f == "adapter_model.safetensors" else \
            FILE_TEXT.get(f, "file saved with the adapter")
        lines.append(f"| `{f}` | {what} |")
    lines += ["", "## Use it", "", "With marl (same checks as a local adapter: base fingerprint, role, score head):", "",
              "```python", "from marl import MultiAdapterModel", "",
              f'model = MultiAdapterModel.from_pretrained("{shown}")',
              f'model.load_adapter("{hub_id}", "{name}"{role_arg})',
              "```", ""]
    if role == "reward":
        lines += [f"or as the reward of a PPO run: `marl ppo --reward_adapter {hub_id}`. Scores are read at the "
                  "EOS token appended to each text, as TRL's RewardTrainer trained them.", ""]
    elif role == "sft":
        lines += [f"or as the reference policy of a PPO run: `marl ppo --sft_adapter {hub_id}`.", ""]
    lines += ["With plain transformers + peft:", "", "```python", f"from transformers import {auto}",
              "from peft import PeftModel", "", f'base = {auto}.from_pretrained("{shown}"{extra})',
              f'model = PeftModel.from_pretrained(base, "{repo_id}"{sub_arg})', "```", ""]
    metrics = public(_metrics(name, meta, manifest))
    if metrics:
        lines += ["## Final metrics", "", "| metric | value |", "| --- | ---: |"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
        lines.append("")
    if config:
        lines += [f"## Training config (`marl {stage}`)", "", "```yaml",
                  yaml.safe_dump(config, sort_keys=True, default_flow_style=False).strip(), "```", ""]
    return "\n".join(lines)


def index_card(repo_id: str, adapters: list[str], run: RunDir, manifest: dict) -> str:
    """Root README.md of a `--subfolders` repo: one line per adapter folder."""
    base = manifest.get("base_model", "unknown")
    front = {"library_name": "peft", "tags": ["marl", "peft", "lora", "rlhf"]}
    if _hub_model_id(base):
        front["base_model"] = base
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {repo_id}", "",
             f"Adapters of one `marl` run on base `{_shown_base(base)}`, one folder each (its own README has the details):", "",
             "| folder | role | load with marl |", "| --- | --- | --- |"]
    for name in adapters:
        f = run.adapter(name) / ADAPTER_META
        role = read_json(f).get("role", "?") if f.exists() else "?"
        lines.append(f"| [`{name}/`](./{name}) | {role} | `model.load_adapter(\"{repo_id}/{name}\", \"{name}\")` |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- upload


def hub_token() -> str:
    """The token for a real push, or a one-line error saying how to provide one."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise MarlError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access), "
                        "or use --dry-run to see what would be uploaded")
    return token


def push(plans: list[RepoPlan], token: str, private: bool = False, revision: str | None = None,
         commit_message: str | None = None, log=print) -> list[str]:
    """Upload each plan as one commit (creating the repo and the branch if needed); returns commit URLs.

    A failure raises one line naming the repo, the step and the cause; nothing local changes.
    """
    from huggingface_hub import CommitOperationAdd, HfApi, constants

    if constants.HF_HUB_OFFLINE:
        raise MarlError("HF_HUB_OFFLINE is set: unset it (or HF_HUB_OFFLINE=0) to push to the Hub")
    api = HfApi(token=token)
    urls, done = [], []
    for plan in plans:
        step = "create repo"
        try:
            api.create_repo(plan.repo_id, private=private or None, exist_ok=True)  # None: the namespace default
            if revision and revision != "main":
                step = f"create branch {revision}"
                api.create_branch(plan.repo_id, branch=revision, exist_ok=True)
            step = "commit"
            log(f"push: uploading {len(plan.files)} files ({_bytes(sum(f.size for f in plan.files))}) "
                f"to {plan.repo_id}")
            ops = [CommitOperationAdd(f.path_in_repo, f.data if f.data is not None else str(f.local))
                   for f in plan.files]
            message = commit_message or f"Upload marl adapter{'s' if len(plan.adapters) > 1 else ''} " \
                                        f"{', '.join(plan.adapters)}"
            info = api.create_commit(plan.repo_id, ops, commit_message=message, revision=revision)
        except Exception as e:  # noqa: BLE001 - any client or server failure becomes one line
            first = (str(e).strip().splitlines() or [""])[0].replace(token, "***")
            already = f" (already uploaded: {', '.join(done)})" if done else ""
            raise MarlError(f"upload of {', '.join(plan.adapters)} to {plan.repo_id} failed at {step}: "
                            f"{e.__class__.__name__}: {first}{already}; local files are unchanged") from None
        done.append(plan.repo_id)
        urls.append(str(info.commit_url))
        log(f"push: {plan.repo_id}: {info.commit_url}")
    return urls
