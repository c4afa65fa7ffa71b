"""The named LoRA adapters on one shared base and the heads that go with them: the bookkeeping.

`AdapterRegistry` keeps one `AdapterRecord` per adapter (role, LoRA parameters, source,
trainable, critic) in one dict keyed by name, the peft model the adapters live in, and each
adapter's value head or score head. It is the one place that adds an adapter (`inject`, then
`finish_adding`), removes one, says which train (`set_trainable`, `apply_trainability`) and
switches between them (`activate`, `use`, always restored in `finally`). Which adapter is
trainable is tracked here explicitly, because peft's `set_adapter` flips `requires_grad` on its
own (docs/known-issues.md #3).

`MultiAdapterModel` (marl.model) holds one and adds the forward passes; the loader
(marl.model_io) adds and saves adapters through this interface alone.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .errors import MarlError
from .multilora import BASE_NAME, Execution

ROLES = ("sft", "reward", "policy", "critic")
SCORE_MODULES = ("score", "classifier")  # the head peft keeps for a SEQ_CLS (reward) adapter


@dataclass
class AdapterRecord:
    """What the registry keeps about one adapter, besides its LoRA modules (in peft) and its heads.

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


class AdapterRegistry:
    """The adapters of one base: records, the peft model, heads, trainability and the active adapter.

    Args:
        base: a transformers causal LM (possibly quantized); its own weights are frozen here.
        base_name: the name or path it was loaded from (written into manifests).
        fingerprint: its `base_fingerprint`; adapters from another base are refused (marl.model_io).
    """

    def __init__(self, base: nn.Module, base_name: str, fingerprint: str):
        self.base, self.base_name, self.fingerprint = base, base_name, fingerprint
        self.peft = None  # a peft PeftModel once the first adapter exists
        self.records: dict[str, AdapterRecord] = {}  # one record per adapter, in the order added
        # an adapter has a value head, a score head (reward), or none; the model registers these dicts as its
        # own submodules, so the heads move, train and are named with it (`value_heads.<name>.weight`)
        self.value_heads = nn.ModuleDict()
        self.score_heads = nn.ModuleDict()
        self.reward_adapter_name: str | None = None  # the reward adapter scoring uses by default
        self.active: str | None = None
        self.switches = 0  # adapter switches made so far (use, activate, scoring): bench/overhead.py
        self.execution = Execution()  # how mixed-adapter batches run (marl.multilora)
        self._tuner_cache: tuple[list[nn.Module] | None] | None = None
        for p in base.parameters():
            p.requires_grad_(False)

    @property
    def hidden_size(self) -> int:
        return self.base.config.get_text_config().hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.base.parameters()).device

    # ---- what there is

    @property
    def names(self) -> list[str]:
        """Every adapter's name, in the order they were added."""
        return list(self.records)

    @property
    def roles(self) -> Mapping[str, str]:
        """Each adapter's role, in the order added (read-only, kept up to date)."""
        return _RecordView(self.records, "role")

    @property
    def critic_of(self) -> Mapping[str, str]:
        """Each policy with a separate critic -> that critic's name (read-only, kept up to date)."""
        return _RecordView(self.records, "critic")

    def record(self, name: str) -> AdapterRecord:
        self.check(name)
        return self.records[name]

    def check(self, name: str) -> None:
        """Refuse a name that is not an adapter here, in one line naming those that are."""
        if name not in self.records:
            known = ", ".join(self.records) or "none"
            raise MarlError(f"unknown adapter {name!r}: this model has {known}")

    def value_head(self, name: str | None) -> nn.Linear | None:
        """Adapter `name`'s value head; None if it has none or is not here."""
        return self.value_heads[name] if name in self.value_heads else None

    def lora_config(self, name: str):
        """Adapter `name`'s peft `LoraConfig` (not a copy)."""
        self.check(name)
        return self.peft.peft_config[name]

    # ---- adding and removing

    def inject(self, name: str, lora_config, role: str, source: str | None = None) -> None:
        """Add `name`'s LoRA modules to the peft model and its record (role, source; not yet trainable);
        `finish_adding` completes it, or `remove` undoes it."""
        from peft import get_peft_model  # peft loads on first use: `import marl` stays cheap

        if name in self.records or name == BASE_NAME:
            raise MarlError(f"adapter name {name!r} is already taken: choose another name")
        lora_config = copy.deepcopy(lora_config)
        lora_config.task_type = "CAUSAL_LM"
        # a reward model's head lives in score_heads, keyed by name; other whole modules an adapter saves stay
        # with it in peft (the stacked multi-LoRA path leaves such an adapter to peft: marl.multilora)
        kept = [m for m in lora_config.modules_to_save or () if m not in SCORE_MODULES]
        lora_config.modules_to_save = kept or None
        lora_config.inference_mode = False
        if self.peft is None:
            self.peft = get_peft_model(self.base, lora_config, adapter_name=name)
        else:
            self.peft.add_adapter(name, lora_config)
        params = [p for n, p in self.peft.named_parameters() if f".{name}." in n]
        self._forget_layers()
        if not params:
            raise MarlError(f"LoRA config for {name!r} matched no layer of the base: check target_modules")
        if self.active is None and not self.records:
            self.active = name
        self.records[name] = AdapterRecord(role, params, source)

    def finish_adding(self, name: str, trainable: bool, value_head: nn.Linear | None = None,
                      score_head: nn.Linear | None = None) -> None:
        """Register a just-injected adapter's heads (a score head makes it the default reward adapter if
        there is none yet) and trainability, then make the active adapter active again."""
        if score_head is not None:
            self.score_heads[name] = score_head.to(self.device)
            self.reward_adapter_name = self.reward_adapter_name or name
        if value_head is not None:
            self.value_heads[name] = value_head.to(self.device)
        self.records[name].trainable = trainable
        self.activate(self.active)

    def remove(self, name: str) -> None:
        """Undo `inject` of an adapter that failed to load."""
        self.peft.delete_adapter(name)
        self.records.pop(name, None)
        self._forget_layers()
        if self.active == name:
            self.active = None
        self.activate(self.active)

    def adopt(self, peft, roles: Mapping[str, str], new_value_head) -> None:
        """Take over the adapters of `peft`, a peft model already on this base, in place: each gets the role
        `roles` names (default sft); policies and critics get a value head from `new_value_head()` and train."""
        self.peft = peft
        self._forget_layers()
        for adapter in peft.peft_config:
            self.records[adapter] = AdapterRecord(roles.get(adapter, "sft"),
                                                  [p for n, p in peft.named_parameters() if f".{adapter}." in n])
        active = peft.active_adapter
        self.active = active if isinstance(active, str) else active[0]
        for adapter, record in self.records.items():
            trains = record.role in ("policy", "critic")
            self.finish_adding(adapter, trains, value_head=new_value_head() if trains else None)
        self.apply_trainability()

    def _forget_layers(self) -> None:
        self._tuner_cache = None  # the adapter layers are rescanned on next use
        self.execution.forget_layers()

    def copy_weights(self, source: str, target: str) -> None:
        """Copy adapter `source`'s LoRA weights into adapter `target` (same rank and targets), in place."""
        self.check(source)
        self.check(target)
        src = {n.replace(f".{source}.", f".{target}."): p for n, p in self.peft.named_parameters()
               if f".{source}." in n}
        with torch.no_grad():
            for n, p in self.peft.named_parameters():
                if f".{target}." in n:
                    p.copy_(src[n])

    # ---- trainability

    def apply_trainability(self) -> None:
        """Set `requires_grad` of every adapter's parameters and value head from its record; score heads never train."""
        for record in self.records.values():
            for p in record.params:
                p.requires_grad_(record.trainable)
        for name, head in self.value_heads.items():
            head.requires_grad_(self.records[name].trainable)
        for head in self.score_heads.values():
            head.requires_grad_(False)

    def set_trainable(self, names: Sequence[str]) -> None:
        """Make exactly these adapters (their value heads and critics) trainable; everything else frozen."""
        for n in names:
            self.check(n)
        chosen = (set(names) | {self.records[n].critic for n in names}) - {None}
        for name, record in self.records.items():
            record.trainable = name in chosen
        self.apply_trainability()

    def attach_critic(self, policy: str, critic: str) -> None:
        """Give `policy` the separate critic `critic` (which has a value head); the policy's own value head is
        dropped, and the critic trains when the policy does."""
        self.check(policy)
        self.check(critic)
        if critic not in self.value_heads:
            raise MarlError(f"critic {critic!r} has no value head: add it with role='critic'")
        if policy in self.value_heads:
            del self.value_heads[policy]
        self.records[policy].critic = critic
        if self.records[policy].trainable:
            self.records[critic].trainable = True
        self.apply_trainability()

    @property
    def trainable_adapters(self) -> list[str]:
        """The adapters whose parameters (and value heads) currently train."""
        return sorted(n for n, r in self.records.items() if r.trainable)

    def trainable_parameters(self, name: str) -> list[nn.Parameter]:
        """The parameters an optimizer for adapter `name` owns: its LoRA weights and value head
        (with a separate critic: the critic's LoRA and value head too)."""
        record = self.record(name)
        params = list(record.params)
        if name in self.value_heads:
            params += list(self.value_heads[name].parameters())
        if record.critic is not None:
            params += self.trainable_parameters(record.critic)
        return params

    # ---- switching

    def activate(self, name: str | None) -> None:
        """Make adapter `name` active (None: all adapters disabled) until changed."""
        self.switches += 1
        if name is not None:
            self.check(name)
        if self.peft is None:
            return
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
            self.active = name
            return
        if name is None:
            self.peft.base_model.disable_adapter_layers()
        else:
            self.peft.base_model.enable_adapter_layers()
            self.peft.set_adapter(name)
        self.active = name
        self.apply_trainability()  # peft's set_adapter / enable flip requires_grad

    @contextlib.contextmanager
    def use(self, name: str | None) -> Iterator[None]:
        """Run the body with adapter `name` active (None: all adapters disabled), then restore."""
        previous = self.active
        self.activate(name)
        try:
            yield
        finally:
            self.activate(previous)

    def _tuner_layers(self) -> list[nn.Module] | None:
        """peft's adapter layers, cached; None when the model has modules peft switches in other ways."""
        if self._tuner_cache is None:
            from peft.tuners.tuners_utils import BaseTunerLayer  # peft loads on first use (see `inject`)
            from peft.utils.other import AuxiliaryTrainingWrapper

            mods = list(self.peft.modules())
            aux = any(isinstance(m, AuxiliaryTrainingWrapper) for m in mods)
            self._tuner_cache = (None if aux else [m for m in mods if isinstance(m, BaseTunerLayer)],)
        return self._tuner_cache[0]
