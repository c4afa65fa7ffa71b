"""What the Trainer-based stages (sft, reward) share: trainer arguments, resume, quiet logs."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

from marl.errors import MarlError


def quiet() -> None:
    """Silence the dependencies' per-call chatter; progress bars and our own lines stay."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
    warnings.filterwarnings("ignore", message=".*inputs will be cast.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def set_threads(cfg) -> None:
    """Apply `torch_threads`: on a small model, one thread beats two fighting over the cores."""
    if cfg.torch_threads:
        import torch

        torch.set_num_threads(cfg.torch_threads)


def report_to(cfg) -> list[str]:
    targets = cfg.report_to if isinstance(cfg.report_to, list) else [cfg.report_to]
    return [t for t in targets if t and t != "none"]


def trainer_kwargs(cfg, run, stage: str) -> dict:
    """Arguments common to TRL's SFTConfig and RewardConfig for one stage of a run."""
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(run.logs / stage)
    return dict(
        output_dir=str(run.checkpoints(stage)),
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a float < 1 is a ratio of the steps
        lr_scheduler_type=cfg.lr_scheduler_type,
        weight_decay=cfg.weight_decay,
        logging_steps=cfg.logging_steps,
        save_steps=cfg.save_steps,
        save_total_limit=2,
        seed=cfg.seed,
        report_to=report_to(cfg),
        gradient_checkpointing=cfg.gradient_checkpointing,
        use_cpu=not _cuda(),
        bf16=cfg.quantization == "bf16",
        max_length=cfg.max_length,
        dataloader_num_workers=0,
        disable_tqdm=False,
    )


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def resume_checkpoint(cfg, run, stage: str) -> str | None:
    """The newest checkpoint-N folder to resume from, when `--resume true` was asked."""
    if not cfg.resume:
        return None
    ckpts = sorted(Path(run.checkpoints(stage)).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    if not ckpts:
        raise MarlError(f"--resume true but {run.checkpoints(stage)} has no checkpoint: run without --resume")
    return str(ckpts[-1])
