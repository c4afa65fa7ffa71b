"""One shared base model, many named LoRA adapters, and the heads that go with them.

`MultiAdapterModel` loads a causal LM once (full precision, bf16, 8-bit or 4-bit)
and keeps every RLHF role on it as a named peft adapter:

- `sft`      causal-LM LoRA (stage 1), frozen later as the PPO reference;
- `reward`   the LoRA that TRL's RewardTrainer trained, with its score head;
- policies   one LoRA per PPO policy, each with its own value head.

Switching is done in one place (`use_adapter`), always restored in `finally`.
Which adapter is trainable is tracked here explicitly, because peft's
`set_adapter` flips `requires_grad` on its own (docs/known-issues.md #3).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from .errors import MarlError
from .io import atomic_dir, atomic_write_json, load_tensors, read_json, save_tensors

logger = logging.getLogger(__name__)

QUANTIZATIONS = ("none", "bf16", "8bit", "4bit")
ROLES = ("sft", "reward", "policy", "critic")
ADAPTER_META = "marl_adapter.json"
VALUE_HEAD_FILE = "value_head.safetensors"
BASE_NAME = "__base__"  # peft's name for "no adapter" rows in a mixed-adapter batch


# --------------------------------------------------------------------------- loading


def quantization_config(quantization: str, compute_dtype: str = "float32", double_quant: bool = True):
    """The `BitsAndBytesConfig` for a quantization name, or None for none / bf16."""
    if quantization not in QUANTIZATIONS:
        raise MarlError(f"unknown quantization {quantization!r}: use one of {', '.join(QUANTIZATIONS)}")
    if quantization in ("none", "bf16"):
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=getattr(torch, compute_dtype),
        bnb_4bit_use_double_quant=double_quant,
    )


def disable_4bit_cpu_inference_kernel(model: nn.Module) -> int:
    """Keep bitsandbytes 4-bit layers on their autograd-safe path on the CPU.

    On a CPU with AVX512-BF16, the first inference-style call repacks a
    `Linear4bit` weight for `gemv_4bit`, which has no autograd kernel: LoRA
    gradients after any `generate` are then silently wrong (docs/known-issues.md #1).
    Returns the number of layers changed.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    n = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def load_base(
    name_or_path: str,
    *,
    quantization: str = "none",
    bnb_4bit_compute_dtype: str = "float32",
    bnb_4bit_use_double_quant: bool = True,
    trust_remote_code: bool = False,
    model_class=None,
    **kwargs,
):
    """Load a base model through the ordinary `from_pretrained` path.

    `model_class` defaults to `AutoModelForCausalLM`; the reward stage passes
    `AutoModelForSequenceClassification`. Extra kwargs go to `from_pretrained`.
    """
    from transformers import AutoModelForCausalLM

    model_class = model_class or AutoModelForCausalLM
    check_model_exists(name_or_path)
    qconfig = quantization_config(quantization, bnb_4bit_compute_dtype, bnb_4bit_use_double_quant)
    dtype = torch.bfloat16 if quantization == "bf16" else (
        getattr(torch, bnb_4bit_compute_dtype) if quantization == "4bit" else torch.float32
    )
    if torch.cuda.is_available():  # this process's GPU (dist.init sets it from LOCAL_RANK), as accelerate places it
        kwargs.setdefault("device_map", {"": torch.cuda.current_device()})
    elif qconfig is not None:
        kwargs.setdefault("device_map", {"": "cpu"})
    with model_load_errors(name_or_path):
        model = model_class.from_pretrained(
            name_or_path, quantization_config=qconfig, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs
        )
    if quantization == "4bit":
        disable_4bit_cpu_inference_kernel(model)
    return model


def check_model_exists(name_or_path: str) -> None:
    """Fail early, in one line, for a local-looking path that is not there or holds no weights,
    and for a Hub id that is not in the cache when the Hub is off (HF_HUB_OFFLINE=1)."""
    p = Path(name_or_path)
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or p.exists()
    if looks_local and not (p.expanduser() / "config.json").exists():
        raise MarlError(
            f"model {name_or_path!r} not found: give a folder with config.json or a Hub model id "
            "(or `default` for the embedded tiny model)"
        )
    if looks_local:
        folder = p.expanduser()
        if not any(next(folder.glob(pattern), None) for pattern in WEIGHT_FILES):
            raise MarlError(f"model folder {name_or_path} has config.json but no weights (model.safetensors): "
                            "save the model there with save_pretrained, or give another folder or Hub id")
        return
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(name_or_path, "config.json"), str):
        raise MarlError(f"model {name_or_path!r} is not in the local Hugging Face cache and the Hub is off "
                        "(HF_HUB_OFFLINE=1): check the id, download it once with the Hub on, or give a local folder")


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.gguf")


@contextlib.contextmanager
def model_load_errors(name_or_path: str) -> Iterator[None]:
    """transformers' OSError for a model it cannot find or read, as one line (a full disk stays itself)."""
    import errno

    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as e:
        raise MarlError(f"model {name_or_path!r} has an unreadable weights file ({str(e).splitlines()[0]}): it is "
                        "truncated or corrupt; save or download it again") from e
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EACCES, errno.EPERM, errno.EROFS, errno.EDQUOT):
            raise
        raise MarlError(f"model {name_or_path!r} could not be loaded ({str(e).strip().splitlines()[0]}): check the "
                        "name, the network (offline: a local folder or a cached id), or the folder's files") from e


def model_context(name_or_path: str, trust_remote_code: bool = False) -> int | None:
    """The base's context length (`max_position_embeddings` of its config), or None if it names none."""
    from transformers import AutoConfig

    check_model_exists(name_or_path)
    with model_load_errors(name_or_path):
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    return getattr(config.get_text_config(), "max_position_embeddings", None)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, padding_side: str = "left"):
    """The base's tokenizer, with a pad token guaranteed (the EOS token if it has none)."""
    from transformers import AutoTokenizer

    with model_load_errors(name_or_path):
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise MarlError(f"tokenizer of {name_or_path!r} has neither a pad nor an EOS token: add one")
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def base_fingerprint(name_or_path: str) -> str:
    """A short, stable id of a base model's weights and config, independent of how it is loaded.

    Hashes the normalised config.json and, for each safetensors file, its size and its
    first and last MiB: cheap on multi-GB checkpoints, yet any other base differs.
    """
    folder = _local_model_folder(name_or_path)
    h = hashlib.sha256()
    if folder is None:  # a hub id we cannot see locally: the name is all we have
        h.update(name_or_path.encode())
        return "name:" + h.hexdigest()[:16]
    config = read_json(folder / "config.json")
    for key in ("dtype", "torch_dtype", "quantization_config", "transformers_version", "_name_or_path",
                "architectures", "num_labels", "id2label", "label2id", "pad_token_id", "use_cache"):
        config.pop(key, None)
    h.update(json.dumps(config, sort_keys=True).encode())
    for f in sorted(folder.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def _local_model_folder(name_or_path: str) -> Path | None:
    p = Path(name_or_path).expanduser()
    if (p / "config.json").exists():
        return p
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, local_files_only=True,
                                      allow_patterns=["config.json", "*.safetensors"]))
    except Exception:  # noqa: BLE001 - not in the local cache: fall back to the name
        return None


def _named_base_folder(named: str) -> Path | None:
    """The local folder of a base named in an adapter_config.json, if it is here (never downloads or builds)."""
    from .default import BUILDER_VERSION, DEFAULT_MODEL, default_cache_dir

    if named == DEFAULT_MODEL:
        folder = default_cache_dir() / BUILDER_VERSION / "model"
        return folder if (folder / "config.json").exists() else None
    return _local_model_folder(named)


def resolve_adapter_path(path_or_id: str) -> Path:
    """A local adapter folder, or a Hub adapter (`user/name[/subfolder][@revision]`) fetched by marl.hub."""
    p = Path(path_or_id).expanduser()
    if p.exists():
        if not (p / "adapter_config.json").exists():
            raise MarlError(f"{p} is not an adapter folder (no adapter_config.json): point to adapters/<name>")
        return p
    from .hub import download_adapter, looks_like_hub_adapter

    if looks_like_hub_adapter(path_or_id):
        return download_adapter(path_or_id)
    raise MarlError(f"adapter path {path_or_id!r} does not exist: give adapters/<name> of a run or a Hub id user/name")


# --------------------------------------------------------------------------- the model


@dataclass
class AdapterRecord:
    """What the model keeps about one adapter, besides its LoRA modules (in peft) and its heads.

    Args:
        role: one of ROLES.
        params: its LoRA weights in the peft model (what an optimizer for it owns).
        source: the folder or Hub id it was loaded from; None for an adapter made here.
        trainable: whether its LoRA weights and value head train (see `set_trainable`).
        critic: a policy's separate critic adapter (PPO `value_model: adapter`), else None.
    """

    role: str
    params: list[nn.Parameter]
    source: str | None = None
    trainable: bool = False
    critic: str | None = None


class _RecordView(Mapping):
    """A live, read-only mapping: adapter name -> one field of its record (adapters where it is not None)."""

    def __init__(self, records: dict[str, AdapterRecord], field: str):
        self._records, self._field = records, field

    def __getitem__(self, name: str):
        value = getattr(self._records[name], self._field)
        if value is None:
            raise KeyError(name)
        return value

    def __iter__(self) -> Iterator[str]:
        return (n for n, r in self._records.items() if getattr(r, self._field) is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return repr(dict(self))


class MultiAdapterModel(nn.Module):
    """A causal LM loaded once, with named LoRA adapters, value heads and score heads.

    Args:
        base: a transformers causal LM (possibly quantized).
        tokenizer: its tokenizer (pad token set).
        base_name: the name or path it was loaded from (written into manifests).
        fingerprint: `base_fingerprint(base_name)`; adapters from another base are refused.
    """

    def __init__(self, base, tokenizer, base_name: str, fingerprint: str):
        super().__init__()
        self.base = base
        self.tokenizer = tokenizer
        self.base_name = base_name
        self.fingerprint = fingerprint
        self.peft = None  # a peft PeftModel once the first adapter exists
        self._adapters: dict[str, AdapterRecord] = {}  # one record per adapter, in the order added
        # the heads are torch modules, registered here so they move, train and are named with the model
        # (`value_heads.<name>.weight`); an adapter has a value head, a score head (reward), or none
        self.value_heads = nn.ModuleDict()
        self.score_heads = nn.ModuleDict()
        self.reward_adapter_name: str | None = None  # the reward adapter `compute_reward_score` uses by default
        self._active: str | None = None
        self.multi_lora = "batched"  # how mixed-adapter batches run: "batched" (stacked LoRA) or "peft"
        self._lora_layers = None
        self._tuner_cache: tuple[list[nn.Module] | None] | None = None
        for p in self.base.parameters():
            p.requires_grad_(False)

    # ---- construction

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        quantization: str = "none",
        bnb_4bit_compute_dtype: str = "float32",
        bnb_4bit_use_double_quant: bool = True,
        trust_remote_code: bool = False,
        **kwargs,
    ) -> "MultiAdapterModel":
        """Load the base once (`default` means the embedded tiny model) and its tokenizer."""
        from .default import resolve_model

        path = resolve_model(name_or_path)
        base = load_base(path, quantization=quantization, bnb_4bit_compute_dtype=bnb_4bit_compute_dtype,
                         bnb_4bit_use_double_quant=bnb_4bit_use_double_quant,
                         trust_remote_code=trust_remote_code, **kwargs)
        tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
        if base.config.pad_token_id is None:
            base.config.pad_token_id = tokenizer.pad_token_id
        model = cls(base, tokenizer, base_name=name_or_path, fingerprint=base_fingerprint(path))
        model.quantization = quantization
        return model

    @property
    def device(self) -> torch.device:
        return next(self.base.parameters()).device

    @property
    def hidden_size(self) -> int:
        return self.base.config.get_text_config().hidden_size

    @property
    def adapter_names(self) -> list[str]:
        """Every adapter's name, in the order they were added."""
        return list(self._adapters)

    @property
    def roles(self) -> Mapping[str, str]:
        """Each adapter's role, in the order added (read-only, kept up to date)."""
        return _RecordView(self._adapters, "role")

    @property
    def critic_of(self) -> Mapping[str, str]:
        """Each policy with a separate critic -> that critic's name (read-only, kept up to date; `attach_critic`)."""
        return _RecordView(self._adapters, "critic")

    def value_head(self, name: str | None) -> nn.Linear | None:
        """Adapter `name`'s value head; None if it has none (a reference, a reward adapter, a policy with a
        critic) or is not on the model."""
        return self.value_heads[name] if name in self.value_heads else None

    def _record(self, name: str) -> AdapterRecord:
        self._check_name(name)
        return self._adapters[name]

    def _check_name(self, name: str) -> None:
        if name not in self._adapters:
            known = ", ".join(self._adapters) or "none"
            raise MarlError(f"unknown adapter {name!r}: this model has {known}")

    def _inject(self, name: str, lora_config, role: str, source: str | None = None) -> None:
        """Add `name`'s LoRA modules to the peft model and its record (role, source; not yet trainable)."""
        from peft import get_peft_model

        if name in self._adapters or name == BASE_NAME:
            raise MarlError(f"adapter name {name!r} is already taken: choose another name")
        lora_config = copy.deepcopy(lora_config)
        lora_config.task_type = "CAUSAL_LM"
        lora_config.modules_to_save = None  # heads live in value_heads / score_heads, keyed by name
        lora_config.inference_mode = False
        if self.peft is None:
            self.peft = get_peft_model(self.base, lora_config, adapter_name=name)
        else:
            self.peft.add_adapter(name, lora_config)
        params = [p for n, p in self.peft.named_parameters() if f".{name}." in n]
        self._lora_layers = self._tuner_cache = None  # rescanned on next use
        if not params:
            raise MarlError(f"LoRA config for {name!r} matched no layer of the base: check target_modules")
        if self._active is None and not self._adapters:
            self._active = name
        self._adapters[name] = AdapterRecord(role, params, source)

    def add_adapter(self, name: str, lora_config, role: str = "policy", trainable: bool = True,
                    init_from: str | None = None, value_head: bool | None = None) -> None:
        """Add a new LoRA adapter called `name` (fresh, or a copy of adapter `init_from`).

        With `init_from`, rank and target modules are the source's; `lora_config` then only
        sets the dropout (PPO policies use 0, so that log-probs in training match the rollout's).

        Policies and critics get a value head (a linear layer on the last hidden state,
        zero-initialised bias) unless `value_head=False`.
        """
        if role not in ROLES:
            raise MarlError(f"unknown role {role!r}: use one of {', '.join(ROLES)}")
        if init_from is not None:  # the source's shape (rank, targets); dropout from the given config
            self._check_name(init_from)
            source = copy.deepcopy(self.peft.peft_config[init_from])
            if lora_config is not None:
                source.lora_dropout = lora_config.lora_dropout
            lora_config = source
        self._inject(name, lora_config, role)
        if init_from is not None:
            src = {n.replace(f".{init_from}.", f".{name}."): p for n, p in self.peft.named_parameters()
                   if f".{init_from}." in n}
            with torch.no_grad():
                for n, p in self.peft.named_parameters():
                    if f".{name}." in n:
                        p.copy_(src[n])
        if value_head if value_head is not None else role in ("policy", "critic"):
            head = nn.Linear(self.hidden_size, 1).to(self.device)
            with torch.no_grad():
                head.weight.normal_(0.0, 1.0 / (self.hidden_size + 1))
                head.bias.zero_()
            self.value_heads[name] = head
        self._adapters[name].trainable = trainable
        self._restore_active()

    def load_adapter(self, path_or_id: str, name: str | None = None, role: str | None = None,
                     trainable: bool = False, score_index: int | None = None) -> str:
        """Load a saved adapter (a run's `adapters/<name>` or a Hub id) under `name`.

        The adapter's base fingerprint must match this base. A reward adapter's score
        head (saved by RewardTrainer as a peft `modules_to_save`) becomes
        `score_heads[name]`; a policy's `value_head.safetensors` becomes its value head.
        A score head with several outputs (old TRL reward adapters with 2 labels) needs
        `score_index`, the output that scores. Returns the adapter name.
        """
        from peft import LoraConfig, set_peft_model_state_dict

        folder = resolve_adapter_path(path_or_id)
        meta = read_json(folder / ADAPTER_META) if (folder / ADAPTER_META).exists() else {}
        name = name or meta.get("name") or folder.name
        if role is not None and meta.get("role") == "reward" and role != "reward":
            raise MarlError(f"adapter {path_or_id!r} is a reward adapter (it scores text, it does not generate): "
                            f"it cannot be loaded as the {role} adapter; give an sft or policy adapter")
        role = role or meta.get("role") or "policy"
        fp = meta.get("base_fingerprint")
        if fp is not None and fp != self.fingerprint:
            raise MarlError(
                f"adapter {path_or_id!r} was trained on base {meta.get('base_model')!r} (fingerprint {fp}), "
                f"not on {self.base_name!r} ({self.fingerprint}): load it with --model_name_or_path "
                f"{meta.get('base_model')}"
            )
        config = LoraConfig.from_pretrained(str(folder))
        named = config.base_model_name_or_path
        unverified = fp is None and self._check_named_base(named, path_or_id)
        weights_file = folder / "adapter_model.safetensors"
        if not weights_file.exists():
            raise MarlError(f"{folder} has no adapter_model.safetensors: only safetensors adapters are loaded")
        state = load_tensors(weights_file)
        score = {k.rsplit(".", 1)[-1]: v for k, v in state.items() if _is_score_key(k)}
        lora_state = {k: v for k, v in state.items() if not _is_score_key(k)}
        if role == "reward":  # checked before anything is added, so a refused adapter leaves no trace
            if "weight" not in score:
                raise MarlError(f"reward adapter {path_or_id!r} has no score head: train it with `marl reward`")
            score = _pick_score_output(score, score_index, path_or_id)
        needs = f"its base {named!r}" if named and named != self.base_name else "the base it was trained on"
        try:
            self._inject(name, config, role, source=str(path_or_id))
        except ValueError as e:  # peft: none of its target modules is a module of this base
            if "target modules" not in str(e).lower():
                raise
            raise MarlError(f"adapter {path_or_id!r} does not fit base {self.base_name!r} (its target modules "
                            f"{sorted(config.target_modules)} are not in it): load it onto {needs}") from e
        try:
            result = set_peft_model_state_dict(self.peft, lora_state, adapter_name=name)
        except RuntimeError as e:  # shape mismatch: another base
            self._remove_injected(name)
            raise MarlError(f"adapter {path_or_id!r} does not fit base {self.base_name!r} ({str(e).splitlines()[0]}):"
                            f" load it onto {needs}") from e
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        if unexpected:
            self._remove_injected(name)
            raise MarlError(f"adapter {path_or_id!r} does not fit base {self.base_name!r}: "
                            f"{len(unexpected)} weights match no layer (e.g. {unexpected[0]})")
        if unverified:
            logger.warning("marl: warning: adapter %r names base %r, which is not here to compare with %r; its layer "
                           "shapes and target modules fit, so it is loaded: make sure it was trained on this base",
                           path_or_id, named, self.base_name)
        if role == "reward":
            head = nn.Linear(score["weight"].shape[1], score["weight"].shape[0], bias="bias" in score)
            head.load_state_dict({k: v.float() for k, v in score.items()})
            self.score_heads[name] = head.to(self.device)
            self.reward_adapter_name = self.reward_adapter_name or name
        if (folder / VALUE_HEAD_FILE).exists():
            head = nn.Linear(self.hidden_size, 1)
            head.load_state_dict(load_tensors(folder / VALUE_HEAD_FILE))
            self.value_heads[name] = head.to(self.device)
        self._adapters[name].trainable = trainable
        self._restore_active()
        return name

    def _check_named_base(self, named: str | None, source: str) -> bool:
        """An adapter without marl's fingerprint names its base in adapter_config.json: compare that base.

        Refuses it when the named base is here and is another model; returns True when the name
        differs but the named base is not here (only the layer shapes can then be checked).
        """
        if not named or named == self.base_name:
            return False
        folder = _named_base_folder(named)
        if folder is None:
            return True
        if base_fingerprint(str(folder)) != self.fingerprint:
            raise MarlError(f"adapter {source!r} does not fit base {self.base_name!r}: it was trained on base "
                            f"{named!r}, another model: load it with --model_name_or_path {named}")
        return False

    def _remove_injected(self, name: str) -> None:
        """Undo `_inject` of an adapter that failed to load."""
        self.peft.delete_adapter(name)
        self._adapters.pop(name, None)
        self._lora_layers = self._tuner_cache = None
        if self._active == name:
            self._active = None
        self._restore_active()

    def load_adapter_weights(self, name: str, folder: str | os.PathLike) -> None:
        """Overwrite the weights (and value head) of existing adapter `name` from a saved folder."""
        from peft import set_peft_model_state_dict

        self._check_name(name)
        folder = Path(folder)
        state = {k: v for k, v in load_tensors(folder / "adapter_model.safetensors").items() if not _is_score_key(k)}
        set_peft_model_state_dict(self.peft, state, adapter_name=name)
        if name in self.value_heads and (folder / VALUE_HEAD_FILE).exists():
            self.value_heads[name].load_state_dict(load_tensors(folder / VALUE_HEAD_FILE))
        self._apply_trainability()

    def save_adapter(self, name: str, out_dir: str | os.PathLike, overwrite: bool = False,
                     extra_meta: dict | None = None) -> Path:
        """Save adapter `name` in peft format (plus its head and marl metadata), atomically.

        A folder saved here loads with plain `PeftModel.from_pretrained(base, out_dir)`.
        Refuses to replace an existing adapter folder unless `overwrite`.
        """
        from peft import get_peft_model_state_dict

        self._check_name(name)
        out_dir = Path(out_dir)
        if out_dir.exists() and not overwrite:
            raise MarlError(f"{out_dir} already holds an adapter: pass --overwrite true to replace it")
        state = get_peft_model_state_dict(self.peft, adapter_name=name)
        config = copy.deepcopy(self.peft.peft_config[name])
        config.inference_mode = True
        config.base_model_name_or_path = self.base_name
        if name in self.score_heads:  # keep RewardTrainer's layout: SEQ_CLS with the score as modules_to_save
            config.task_type = "SEQ_CLS"
            config.modules_to_save = ["score"]
            for k, v in self.score_heads[name].state_dict().items():
                state[f"base_model.model.score.{k}"] = v
        with atomic_dir(out_dir, overwrite=overwrite) as tmp:
            config.save_pretrained(str(tmp))
            save_tensors(tmp / "adapter_model.safetensors", state)
            if name in self.value_heads:
                save_tensors(tmp / VALUE_HEAD_FILE, self.value_heads[name].state_dict())
            atomic_write_json(tmp / ADAPTER_META, {
                "name": name, "role": self._adapters[name].role, "base_model": self.base_name,
                "base_fingerprint": self.fingerprint, **(extra_meta or {}),
            })
        return out_dir

    # ---- switching and trainability

    def _apply_trainability(self) -> None:
        for record in self._adapters.values():
            for p in record.params:
                p.requires_grad_(record.trainable)
        for name, head in self.value_heads.items():
            head.requires_grad_(self._adapters[name].trainable)
        for head in self.score_heads.values():
            head.requires_grad_(False)

    def set_trainable(self, names: Sequence[str]) -> None:
        """Make exactly these adapters (their value heads and critics) trainable; everything else frozen."""
        for n in names:
            self._check_name(n)
        chosen = (set(names) | {self._adapters[n].critic for n in names}) - {None}
        for name, record in self._adapters.items():
            record.trainable = name in chosen
        self._apply_trainability()

    def add_critic(self, policy: str, critic: str, lora_config, init_from: str) -> None:
        """Add adapter `critic` (a copy of adapter `init_from`) with a value head and attach it to `policy`.

        From a reward adapter the value head starts as its score head, so the critic's first values
        are the reward model's scores at every token (as TRL's later PPOTrainer started its value
        model from the reward model); otherwise the value head is fresh.
        """
        self.add_adapter(critic, lora_config, role="critic", init_from=init_from)
        if init_from in self.score_heads:
            score, head = self.score_heads[init_from], self.value_heads[critic]
            with torch.no_grad():
                head.weight.copy_(score.weight[:1].to(head.weight.dtype))
                head.bias.copy_(score.bias[:1] if score.bias is not None else torch.zeros_like(head.bias))
        self.attach_critic(policy, critic)

    def attach_critic(self, policy: str, critic: str) -> None:
        """Give `policy` a separate critic: the values come from adapter `critic` and its value head,
        so the value loss never reaches the policy's LoRA. The policy's own value head is dropped."""
        self._check_name(policy)
        self._check_name(critic)
        if critic not in self.value_heads:
            raise MarlError(f"critic {critic!r} has no value head: add it with role='critic'")
        if policy in self.value_heads:
            del self.value_heads[policy]
        self._adapters[policy].critic = critic
        if self._adapters[policy].trainable:
            self._adapters[critic].trainable = True
        self._apply_trainability()

    @property
    def trainable_adapters(self) -> list[str]:
        """The adapters whose parameters (and value heads) currently train."""
        return sorted(n for n, r in self._adapters.items() if r.trainable)

    def trainable_parameters(self, name: str) -> list[nn.Parameter]:
        """The parameters an optimizer for adapter `name` owns: its LoRA weights and value head
        (with a separate critic: the critic's LoRA and value head too)."""
        record = self._record(name)
        params = list(record.params)
        if name in self.value_heads:
            params += list(self.value_heads[name].parameters())
        if record.critic is not None:
            params += self.trainable_parameters(record.critic)
        return params

    @property
    def active_adapter(self) -> str | None:
        return self._active

    def _activate(self, name: str | None) -> None:
        if self.peft is None:
            if name is not None:
                self._check_name(name)
            return
        if name is not None:
            self._check_name(name)
        layers = self._tuner_layers()
        if layers is not None and not any(layer.merged for layer in layers):
            # what peft's set_adapter / disable_adapter_layers do to the layers, without their walk over
            # every module of the model and without touching requires_grad (~100x cheaper)
            for layer in layers:
                layer._disable_adapters = name is None
                if name is not None:
                    layer._active_adapter = [name]
            if name is not None:
                self.peft.active_adapter = self.peft.base_model.active_adapter = name
            self._active = name
            return
        if name is None:
            self.peft.base_model.disable_adapter_layers()
        else:
            self.peft.base_model.enable_adapter_layers()
            self.peft.set_adapter(name)
        self._active = name
        self._apply_trainability()  # peft's set_adapter / enable flip requires_grad

    def _tuner_layers(self) -> list[nn.Module] | None:
        """peft's adapter layers, cached; None when the model has modules peft switches in other ways."""
        if self._tuner_cache is None:
            from peft.tuners.tuners_utils import BaseTunerLayer
            from peft.utils.other import AuxiliaryTrainingWrapper

            mods = list(self.peft.modules())
            aux = any(isinstance(m, AuxiliaryTrainingWrapper) for m in mods)
            self._tuner_cache = (None if aux else [m for m in mods if isinstance(m, BaseTunerLayer)],)
        return self._tuner_cache[0]

    def _restore_active(self) -> None:
        self._activate(self._active)

    @contextlib.contextmanager
    def use_adapter(self, name: str | None) -> Iterator["MultiAdapterModel"]:
        """Run the body with adapter `name` active (None: all adapters disabled), then restore."""
        previous = self._active
        self._activate(name)
        try:
            yield self
        finally:
            self._activate(previous)

    @contextlib.contextmanager
    def eval_mode(self) -> Iterator["MultiAdapterModel"]:
        """Eval mode (no LoRA dropout) for the body of the `with`, then the caller's mode again."""
        was_training = self.training
        self.eval()
        try:
            yield self
        finally:
            self.train(was_training)

    def set_adapter(self, name: str | None) -> None:
        """Make `name` the active adapter (None: bare base) until changed."""
        self._activate(name)

    # ---- forward passes

    @property
    def lm(self) -> nn.Module:
        """The callable causal LM (the peft wrapper once adapters exist)."""
        return self.peft if self.peft is not None else self.base

    @property
    def backbone(self) -> nn.Module:
        """The decoder without the LM head (hidden states only)."""
        return getattr(self.base, self.base.base_model_prefix)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return self.lm(input_ids=input_ids, attention_mask=attention_mask,
                       position_ids=position_ids_from_mask(attention_mask), **kwargs)

    def policy_forward(self, name: str, input_ids, attention_mask, adapter_names: list[str] | None = None,
                       lm_head: bool = True):
        """Logits (B, T, V) and values (B, T) of policy `name` (its LoRA and value head, or its critic's).

        With `lm_head=False` the first output is the last hidden states (B, T, H) instead, for the
        caller to apply the LM head only where it needs logits (marl.ppo.logprobs)."""
        from .ppo.logprobs import lm_head_fn

        critic = self._record(name).critic
        pos = position_ids_from_mask(attention_mask)
        with self.use_adapter(name):
            hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos,
                                   use_cache=False).last_hidden_state
        if critic is None:
            values = self._values(name, hidden)
        else:
            with self.use_adapter(critic):
                critic_hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                              position_ids=pos).last_hidden_state
            values = self._values(critic, critic_hidden)
        return (lm_head_fn(self.base)(hidden) if lm_head else hidden), values

    def _values(self, name: str, hidden: torch.Tensor) -> torch.Tensor:
        """Values (B, T) of adapter `name`'s value head; zeros for a policy without one (critic-free)."""
        from .multilora import grouped_values, Layout

        return grouped_values(self.value_heads, Layout((name,), (hidden.shape[0],)), hidden)

    @torch.no_grad()
    def compute_reward_score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                             ppo_adapter_name: str | None = None, reward_adapter_name: str | None = None,
                             **_ignored) -> torch.Tensor:
        """Score sequences with the reward adapter and its score head; returns shape (B,).

        The score is read where RewardTrainer's classifier read it: at the last attended token
        that is not the pad token (`reward_token_index`; with pad = EOS, the token before a
        final EOS), so left and right padding give the same scores. Afterwards
        `ppo_adapter_name` is the active adapter (or, if not given, whatever was active
        before), also when this raises.
        """
        name = reward_adapter_name or self.reward_adapter_name
        if name is None or name not in self.score_heads:
            raise MarlError("no reward adapter is loaded: pass reward_adapter= (a run's adapters/reward or a Hub id)")
        if ppo_adapter_name is not None:
            self._check_name(ppo_adapter_name)
        restore = ppo_adapter_name if ppo_adapter_name is not None else self._active
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        try:
            self._activate(name)
            with self.eval_mode():  # scores never sample the reward adapter's LoRA dropout
                hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                                       position_ids=position_ids_from_mask(attention_mask),
                                       use_cache=False).last_hidden_state
            head = self.score_heads[name]
            scores = head(hidden.to(head.weight.dtype)).squeeze(-1)  # (B, T)
            # RewardTrainer's pad: the tokenizer's, else EOS; it becomes the classifier's config.pad_token_id
            pad = self.tokenizer.pad_token_id
            pad = self.tokenizer.eos_token_id if pad is None else pad
            index = reward_token_index(input_ids, attention_mask, pad)
            return scores.gather(1, index[:, None]).squeeze(1).float()
        finally:
            self._activate(restore)

    def score_texts(self, texts: Sequence[str], batch_size: int = 32, **kwargs) -> torch.Tensor:
        """Reward scores (N,) of full texts, built as RewardTrainer built them: EOS appended unless the
        text ends in it, then tokenized as one text (BOS if the tokenizer adds one); any padding side."""
        eos = self.tokenizer.eos_token or ""
        out = []
        for i in range(0, len(texts), batch_size):
            chunk = [t if t.endswith(eos) else t + eos for t in texts[i:i + batch_size]]
            enc = self.tokenizer(chunk, return_tensors="pt", padding=True).to(self.device)
            out.append(self.compute_reward_score(enc["input_ids"], enc["attention_mask"], **kwargs))
        return torch.cat(out) if out else torch.zeros(0)

    def lora_layers(self) -> list[nn.Module]:
        """peft's LoRA layers of the base (scanned once per set of adapters)."""
        from .multilora import lora_layers

        if self._lora_layers is None:
            self._lora_layers = lora_layers(self.peft)
        return self._lora_layers

    def stacked_layout(self, names: Sequence[str | None]):
        """The one decision of how rows of several adapters run (`names`: each row's adapter, None: the bare
        base): the `Layout` of one stacked-LoRA pass over all of them (`multi_lora == "batched"`, more than
        one adapter, each adapter's rows contiguous), or None: each adapter in passes of its own (generate:
        peft's `adapter_names=` path). The PPO trainer and `generate` both ask here."""
        from .multilora import group_layout

        if self.multi_lora != "batched" or len(set(names)) < 2:
            return None
        return group_layout(names)

    def grouped_policy_forward(self, names: Sequence[str], input_ids, attention_mask, lm_head: bool = True):
        """Logits (B, T, V) and values (B, T) of several policies in ONE pass over the base.

        Each policy's rows are contiguous (`names` gives each row's policy; groups may
        differ in size); every LoRA layer applies the stacked factors of all of them
        (marl.multilora). Policies with separate critics take a second grouped pass, under
        the critics, for the values. Gradients reach each policy's own parameters only.
        With `lm_head=False` the first output is the last hidden states (B, T, H) instead.
        """
        from .multilora import group_layout, grouped_lora, grouped_values
        from .ppo.logprobs import lm_head_fn

        layout = group_layout(names)
        if layout is None:
            raise ValueError("grouped_policy_forward needs each policy's rows to be contiguous")
        for g in layout.groups:
            self._check_name(g)
        critics = [self._adapters[g].critic for g in layout.groups]
        pos = position_ids_from_mask(attention_mask)
        with grouped_lora(self.peft, layout, layers=self.lora_layers()):
            hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos,
                                   use_cache=False).last_hidden_state
        if not any(critics):
            values = grouped_values(self.value_heads, layout, hidden)
        else:  # the critic pass runs on the rows of the policies that have a critic (critic-free ones: 0)
            has = [i for i, c in enumerate(critics) if c is not None]
            rows = torch.cat([torch.arange(*layout.bounds()[i], device=input_ids.device) for i in has])
            critic_layout = type(layout)(tuple(critics[i] for i in has), tuple(layout.sizes[i] for i in has))
            with grouped_lora(self.peft, critic_layout, layers=self.lora_layers()):
                critic_hidden = self.backbone(input_ids=input_ids[rows], attention_mask=attention_mask[rows],
                                              position_ids=pos[rows], use_cache=False).last_hidden_state
            v = grouped_values(self.value_heads, critic_layout, critic_hidden)
            values = v.new_zeros(hidden.shape[:2]).index_copy(0, rows, v)
        return (lm_head_fn(self.base)(hidden) if lm_head else hidden), values

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, adapter_names: Sequence[str | None] | str | None = None,
                 **gen_kwargs):
        """Generate, one adapter per row in a single mixed-adapter batch (None rows: bare base).

        With `multi_lora == "batched"` and rows grouped by adapter, the stacked-LoRA path
        runs all adapters at the cost of one; otherwise peft's `adapter_names=` path, which
        peft allows only in eval mode (docs/known-issues.md #4). Eval mode is set for the call.
        """
        from .multilora import grouped_lora

        if isinstance(adapter_names, str) or adapter_names is None:
            names = [adapter_names] * input_ids.shape[0]
        else:
            names = list(adapter_names)
        for n in set(names) - {None}:
            self._check_name(n)
        gen_kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        with self.eval_mode():
            if self.peft is None:
                return self.base.generate(input_ids=input_ids, attention_mask=attention_mask, **gen_kwargs)
            if len(set(names)) == 1:  # one adapter: the plain (faster) path
                with self.use_adapter(names[0]):
                    return self.peft.generate(input_ids=input_ids, attention_mask=attention_mask, **gen_kwargs)
            expands = gen_kwargs.get("num_return_sequences", 1) > 1 or gen_kwargs.get("num_beams", 1) > 1
            layout = None if expands else self.stacked_layout(names)
            with self.use_adapter(next(n for n in names if n is not None)):
                if layout is not None:
                    with grouped_lora(self.peft, layout, cache_weights=True, layers=self.lora_layers()):
                        return self.peft.generate(input_ids=input_ids, attention_mask=attention_mask, **gen_kwargs)
                return self.peft.generate(input_ids=input_ids, attention_mask=attention_mask,
                                          adapter_names=[BASE_NAME if n is None else n for n in names],
                                          **gen_kwargs)


def _pick_score_output(score: dict[str, torch.Tensor], index: int | None, source: str) -> dict[str, torch.Tensor]:
    """The score head reduced to the one output that scores (`index`; only one output: that one)."""
    k = score["weight"].shape[0]
    if k == 1 and index in (None, 0):
        return score
    if index is None:
        raise MarlError(f"reward adapter {source!r} has a score head with {k} outputs: choose the one that scores "
                        f"with reward_score_index (old TRL's multi-adapter example read output 1)")
    if not 0 <= index < k:
        raise MarlError(f"reward_score_index {index} is out of range: reward adapter {source!r} has {k} "
                        f"output{'s' if k > 1 else ''} (0..{k - 1})")
    return {key: v[index:index + 1] for key, v in score.items()}


def _is_score_key(key: str) -> bool:
    return ".score." in key or key.startswith("score.")


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index (B,) of the last attended token of each row, for left or right padding."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(dim=1)


def reward_token_index(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       pad_token_id: int | None) -> torch.Tensor:
    """Index (B,) of the token a transformers `*ForSequenceClassification` pools its score at.

    transformers 5 reads each row at its LAST token whose id is not `pad_token_id` (not "first pad - 1":
    they differ for a row with EOS inside it), so with pad = EOS the EOS that TRL's RewardTrainer appends
    counts as padding and the token before it is read (docs/known-issues.md #2, #7). Here only attended
    tokens count, so a left-padded row gives the index of the same token as right-padded; a row whose
    attended tokens are all pad (an empty text + EOS) gives its first attended token, as transformers
    does on the unpadded row. Without a pad token (None) it is the last attended token.

    Args:
        input_ids: (B, T) token ids.
        attention_mask: (B, T) 1 for real tokens, 0 for padding (left or right).
        pad_token_id: the pad id the classifier was trained with (its `config.pad_token_id`).
    Returns:
        (B,) long positions in [0, T).
    """
    attended = attention_mask.bool()
    keep = attended if pad_token_id is None else attended & (input_ids != pad_token_id)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    last_kept = torch.where(keep, positions, -1).max(dim=1).values
    first_attended = attended.long().argmax(dim=1)  # argmax returns the first maximum
    return torch.where(last_kept >= 0, last_kept, first_attended)


def position_ids_from_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Positions counted over real tokens, so a left-padded row sees the same positions as unpadded."""
    if attention_mask is None:
        return None
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
