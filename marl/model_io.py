"""Loading and saving: the base model (once, possibly quantized), its tokenizer and fingerprint, and
adapters in peft's format with marl's heads and metadata.

A saved adapter folder (`adapters/<name>` of a run) holds peft's `adapter_config.json` and
`adapter_model.safetensors` (a reward adapter's score head inside it, as RewardTrainer saves it),
a policy's or critic's `value_head.safetensors`, and `marl_adapter.json` (name, role, base and
its fingerprint, so an adapter is never loaded onto another base). It loads with plain
`PeftModel.from_pretrained(base, folder)` too.

`MultiAdapterModel.load_adapter`, `load_adapter_weights` and `save_adapter` call the functions here with
the model's `AdapterRegistry` (marl.adapters), whose public methods add, remove and describe adapters.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .chat import set_chat_template, template_stop_ids
from .default import BUILDER_VERSION, DEFAULT_MODEL, default_cache_dir
from .errors import MarlError
from .hub_download import download_adapter, looks_like_hub_adapter
from .io import atomic_dir, atomic_write_json, load_tensors, read_json, save_tensors
from .names import QUANTIZATIONS
from .quant4 import use_dequant_workspace

if TYPE_CHECKING:
    from .adapters import AdapterRegistry

logger = logging.getLogger(__name__)

ADAPTER_META = "marl_adapter.json"
VALUE_HEAD_FILE = "value_head.safetensors"


# --------------------------------------------------------------------------- the base


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
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:  # nothing imported it, so no layer is 4-bit (and importing it prints a kernels warning)
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
        use_dequant_workspace(model)  # no new dequantized weight per call on the CPU (docs/known-issues.md #19)
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


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, padding_side: str = "left",
                   chat_template: str | None = None):
    """The base's tokenizer, with a pad token guaranteed (the EOS token if it has none) and the chat template
    `chat_template` names, if any (marl.chat.set_chat_template)."""
    from transformers import AutoTokenizer

    with model_load_errors(name_or_path):
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    set_chat_template(tok, chat_template)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise MarlError(f"tokenizer of {name_or_path!r} has neither a pad nor an EOS token: add one")
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def stop_token_ids(tokenizer, generation_config=None) -> tuple[int, ...]:
    """The tokens that end a response: the tokenizer's EOS, every id of the checkpoint's
    `generation_config.eos_token_id` (an int or a list: instruct checkpoints end a turn with
    `<|im_end|>` or `<|eot_id|>` beside their end-of-text token), and the end-of-turn token of a
    ChatML template set by marl. Sorted, without duplicates."""
    ids = set() if tokenizer.eos_token_id is None else {tokenizer.eos_token_id}
    listed = getattr(generation_config, "eos_token_id", None)
    if listed is not None:
        ids |= {int(i) for i in ([listed] if isinstance(listed, int) else listed)}
    return tuple(sorted(ids | template_stop_ids(tokenizer)))


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

    if looks_like_hub_adapter(path_or_id):
        return download_adapter(path_or_id)
    raise MarlError(f"adapter path {path_or_id!r} does not exist: give adapters/<name> of a run or a Hub id user/name")



# --------------------------------------------------------------------------- adapters


def load_adapter(adapters: AdapterRegistry, path_or_id: str, name: str | None = None, role: str | None = None,
                 trainable: bool = False, score_index: int | None = None) -> str:
    """Load a saved adapter into `adapters` under `name`: see `MultiAdapterModel.load_adapter`."""
    from peft import LoraConfig, set_peft_model_state_dict

    folder = resolve_adapter_path(path_or_id)
    meta = read_json(folder / ADAPTER_META) if (folder / ADAPTER_META).exists() else {}
    name = name or meta.get("name") or folder.name
    if role is not None and meta.get("role") == "reward" and role != "reward":
        raise MarlError(f"adapter {path_or_id!r} is a reward adapter (it scores text, it does not generate): "
                        f"it cannot be loaded as the {role} adapter; give an sft or policy adapter")
    role = role or meta.get("role") or "policy"
    fp = meta.get("base_fingerprint")
    if fp is not None and fp != adapters.fingerprint:
        raise MarlError(
            f"adapter {path_or_id!r} was trained on base {meta.get('base_model')!r} (fingerprint {fp}), "
            f"not on {adapters.base_name!r} ({adapters.fingerprint}): load it with --model_name_or_path "
            f"{meta.get('base_model')}"
        )
    config = LoraConfig.from_pretrained(str(folder))
    named = config.base_model_name_or_path
    unverified = fp is None and _check_named_base(adapters, named, path_or_id)
    weights_file = folder / "adapter_model.safetensors"
    if not weights_file.exists():
        raise MarlError(f"{folder} has no adapter_model.safetensors: only safetensors adapters are loaded")
    state = load_tensors(weights_file)
    score = {k.rsplit(".", 1)[-1]: v for k, v in state.items() if _is_score_key(k)}
    lora_state = {k: v for k, v in state.items() if not _is_score_key(k)}
    _check_shared_base(config, lora_state, path_or_id)
    if role == "reward":  # checked before anything is added, so a refused adapter leaves no trace
        if "weight" not in score:
            raise MarlError(f"reward adapter {path_or_id!r} has no score head: train it with `marl reward`")
        score = _pick_score_output(score, score_index, path_or_id)
    needs = f"its base {named!r}" if named and named != adapters.base_name else "the base it was trained on"
    try:
        adapters.inject(name, config, role, source=str(path_or_id))
    except ValueError as e:  # peft: none of its target modules is a module of this base
        if "target modules" not in str(e).lower():
            raise
        raise MarlError(f"adapter {path_or_id!r} does not fit base {adapters.base_name!r} (its target modules "
                        f"{sorted(config.target_modules)} are not in it): load it onto {needs}") from e
    try:
        result = set_peft_model_state_dict(adapters.peft, lora_state, adapter_name=name)
    except RuntimeError as e:  # shape mismatch: another base
        adapters.remove(name)
        raise MarlError(f"adapter {path_or_id!r} does not fit base {adapters.base_name!r} ({str(e).splitlines()[0]}):"
                        f" load it onto {needs}") from e
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        adapters.remove(name)
        raise MarlError(f"adapter {path_or_id!r} does not fit base {adapters.base_name!r}: "
                        f"{len(unexpected)} weights match no layer (e.g. {unexpected[0]})")
    if unverified:
        logger.warning("marl: warning: adapter %r names base %r, which is not here to compare with %r; its layer "
                       "shapes and target modules fit, so it is loaded: make sure it was trained on this base",
                       path_or_id, named, adapters.base_name)
    score_head = value_head = None
    if role == "reward":
        score_head = nn.Linear(score["weight"].shape[1], score["weight"].shape[0], bias="bias" in score)
        score_head.load_state_dict({k: v.float() for k, v in score.items()})
    if (folder / VALUE_HEAD_FILE).exists():
        value_head = nn.Linear(adapters.hidden_size, 1)
        value_head.load_state_dict(load_tensors(folder / VALUE_HEAD_FILE))
    adapters.finish_adding(name, trainable, value_head=value_head, score_head=score_head)
    return name


# init_lora_weights values whose initialisation rewrites the base's weights (peft converts such an adapter into a
# plain one with save_pretrained(..., path_initial_model_for_weight_conversion=...))
BASE_REWRITING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")


def _check_shared_base(config, state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse an adapter whose loading would change the base that every other adapter shares."""
    init = config.init_lora_weights
    if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
        raise MarlError(f"adapter {source!r} has init_lora_weights={init!r}, whose initialisation rewrites the base "
                        "that every other adapter shares: convert it to a plain LoRA adapter (peft's save_pretrained "
                        "with path_initial_model_for_weight_conversion) and load that")
    if config.layer_replication:
        raise MarlError(f"adapter {source!r} replicates base layers (layer_replication), which changes the base that "
                        "every other adapter shares: merge it into a base of its own and use that as the base")
    if config.bias != "none" and any(k.endswith(".bias") and "lora_" not in k for k in state):
        raise MarlError(f"adapter {source!r} carries its own copy of the base's biases (bias={config.bias!r}), which "
                        "would replace those every other adapter shares: merge it into a base of its own, or train "
                        "it with bias='none' (lora_bias=True gives the adapter biases of its own)")


def _check_named_base(adapters: AdapterRegistry, named: str | None, source: str) -> bool:
    """An adapter without marl's fingerprint names its base in adapter_config.json: compare that base.

    Refuses it when the named base is here and is another model; returns True when the name
    differs but the named base is not here (only the layer shapes can then be checked).
    """
    if not named or named == adapters.base_name:
        return False
    folder = _named_base_folder(named)
    if folder is None:
        return True
    if base_fingerprint(str(folder)) != adapters.fingerprint:
        raise MarlError(f"adapter {source!r} does not fit base {adapters.base_name!r}: it was trained on base "
                        f"{named!r}, another model: load it with --model_name_or_path {named}")
    return False


def load_adapter_weights(adapters: AdapterRegistry, name: str, folder: str | os.PathLike) -> None:
    """Overwrite the LoRA weights (and value head) of adapter `name` from a saved folder."""
    from peft import set_peft_model_state_dict

    folder = Path(folder)
    state = {k: v for k, v in load_tensors(folder / "adapter_model.safetensors").items() if not _is_score_key(k)}
    set_peft_model_state_dict(adapters.peft, state, adapter_name=name)
    head = adapters.value_head(name)
    if head is not None and (folder / VALUE_HEAD_FILE).exists():
        head.load_state_dict(load_tensors(folder / VALUE_HEAD_FILE))
    adapters.apply_trainability()


def save_adapter(adapters: AdapterRegistry, name: str, out_dir: str | os.PathLike, overwrite: bool = False,
                 extra_meta: dict | None = None) -> Path:
    """Save adapter `name` into `out_dir`, atomically: see `MultiAdapterModel.save_adapter`."""
    from peft import get_peft_model_state_dict

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise MarlError(f"{out_dir} already holds an adapter: pass --overwrite true to replace it")
    state = get_peft_model_state_dict(adapters.peft, adapter_name=name)
    config = copy.deepcopy(adapters.lora_config(name))
    config.inference_mode = True
    config.base_model_name_or_path = adapters.base_name
    if name in adapters.score_heads:  # keep RewardTrainer's layout: SEQ_CLS with the score as modules_to_save
        config.task_type = "SEQ_CLS"
        config.modules_to_save = ["score"]
        for k, v in adapters.score_heads[name].state_dict().items():
            state[f"base_model.model.score.{k}"] = v
    value_head = adapters.value_head(name)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        config.save_pretrained(str(tmp))
        save_tensors(tmp / "adapter_model.safetensors", state)
        if value_head is not None:
            save_tensors(tmp / VALUE_HEAD_FILE, value_head.state_dict())
        atomic_write_json(tmp / ADAPTER_META, {
            "name": name, "role": adapters.roles[name], "base_model": adapters.base_name,
            "base_fingerprint": adapters.fingerprint, **(extra_meta or {}),
        })
    return out_dir


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
