"""What the Trainer-based stages (sft, reward) share: trainer arguments, checkpoints and resume, quiet logs."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import warnings
from pathlib import Path

import torch

from marl import dist
from marl.data import train_eval_splits
from marl.embedded import resolve_model
from marl.errors import MarlError
from marl.io import apply_umask
from marl.model import base_fingerprint, model_context
from marl.run import CHECKPOINT_DONE, RunDir, mark_checkpoint_complete


def quiet() -> None:
    """Silence the dependencies' per-call chatter; progress bars and our own lines stay."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
    warnings.filterwarnings("ignore", message=".*inputs will be cast.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    import transformers  # seconds to import: loaded by the stages that train, not by `marl push`

    transformers.logging.set_verbosity_error()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def set_threads(cfg) -> None:
    """Apply `torch_threads`: on a small model, one thread beats two fighting over the cores."""
    if cfg.torch_threads:
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
    return torch.cuda.is_available()


def resume_checkpoint(cfg, run, stage: str) -> str | None:
    """The newest complete checkpoint-N folder to resume from, when `--resume true` was asked.

    Incomplete ones (a save cut short by a full disk or a kill) are removed, and the
    stage says so in one line.
    """
    if not cfg.resume:
        return None
    complete, incomplete = run.trainer_checkpoints(stage)
    for folder in incomplete:
        shutil.rmtree(folder, ignore_errors=True)
    dropped = f"removed incomplete {', '.join(p.name for p in incomplete)} (a save that did not finish)"
    if not complete:
        raise MarlError(f"--resume true but {run.checkpoints(stage)} has no complete checkpoint"
                        f"{' (' + dropped + ')' if incomplete else ''}: run without --resume")
    if incomplete:
        print(f"{stage}: {dropped}; resuming from {complete[-1].name}", flush=True)
    return str(complete[-1])


def guard_checkpoints(trainer) -> None:
    """Make the Trainer's checkpoint saves all-or-nothing.

    A save that fails (a full disk) removes the folder it started; one that succeeds gets the
    umask's modes and a `marl_checkpoint.json` listing its files, written last. `--resume`
    trusts only marked checkpoints. Wraps `Trainer._save_checkpoint` (docs/known-issues.md #11).
    """
    save = trainer._save_checkpoint

    def _save_checkpoint(model, trial):
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = Path(trainer._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}"
        existed = folder.exists()
        if existed:  # being saved again: it is not complete until the new marker is written
            (folder / CHECKPOINT_DONE).unlink(missing_ok=True)
        try:
            save(model, trial)
            if trainer.args.should_save:
                apply_umask(folder)
                mark_checkpoint_complete(folder, trainer.state.global_step)
        except BaseException:
            if trainer.args.should_save and not existed:
                shutil.rmtree(folder, ignore_errors=True)
            raise

    trainer._save_checkpoint = _save_checkpoint


def check_context(model_path: str, length: int, key: str, trust_remote_code: bool = False) -> None:
    """Refuse `length` tokens beyond the base's context (`max_position_embeddings` in its config.json).

    `key` is the setting, or a sum of settings ("max_prompt_length + max_new_tokens").
    """
    context = model_context(model_path, trust_remote_code)
    if context is not None and length > context:
        fix = "lower one of them" if "+" in key else f"set --{key} {context} or less"
        raise MarlError(f"{key} = {length} exceeds the model's context of {context} tokens: {fix}")


def up_to_date(stage: str, run, adapters: list[str], cfg) -> dict | None:
    """The recorded results of a stage that already finished with these settings (it is skipped).

    The base must still be the one the run recorded (the same name can hold other weights, e.g.
    a rebuilt `default`); if it is not, the stage goes on and refuses the base in one line.
    """
    results = run.finished_results(stage, adapters, cfg)
    if results is not None:
        if run.manifest().get("base_fingerprint") != base_fingerprint(resolve_model(cfg.model_name_or_path)):
            return None
        print(f"{stage}: up to date: {', '.join(str(run.adapter(a)) for a in adapters)} "
              f"{'was' if len(adapters) == 1 else 'were'} made with the same settings; pass --overwrite true to "
              "train again", flush=True)
    return results


@dataclasses.dataclass
class StageStart:
    """What a Trainer-based stage has once it knows it must train: its run folder, the checkpoint to
    resume from (or None), its data, and the base's resolved path (checked against `max_length`)."""

    run_dir: RunDir
    resume_from: str | None
    train: object
    eval: object | None
    model_path: str


def start_stage(cfg, stage: str, text_field: str | None = None) -> StageStart | dict:
    """The opening every Trainer-based stage shares, in this order: quiet logs, threads, seed; the
    recorded results when the stage is up to date (a dict: the caller returns it); the resume
    checkpoint (before any loading, so a bad --resume fails fast); the data; the context check; the run folder."""
    quiet()
    set_threads(cfg)
    from transformers import set_seed  # transformers: see `quiet`

    set_seed(cfg.seed)
    run_dir = RunDir(cfg.run_dir)
    done = up_to_date(stage, run_dir, [cfg.adapter_name], cfg)
    if done is not None:
        return done
    resume_from = resume_checkpoint(cfg, run_dir, stage)
    train, eval_ds = train_eval_splits(cfg, stage, text_field)
    path = resolve_model(cfg.model_name_or_path)
    check_context(path, cfg.max_length, "max_length", cfg.trust_remote_code)
    run_dir.create()  # last: bad input above leaves no run folder behind
    return StageStart(run_dir, resume_from, train, eval_ds, path)


def log_training(stage: str, run_dir: RunDir, trainer, results: dict) -> bool:
    """After `trainer.train()`: the parameter digest (`marl.dist`), then, on the main process only,
    the Trainer's log history and the final results in metrics.jsonl. False on the other processes:
    the Trainer averaged their gradients, and only the main process writes."""
    dist.write_digest(stage, trainer.model.named_parameters())
    if not dist.is_main():
        return False
    for rec in trainer.state.log_history:
        run_dir.log_metrics({"stage": stage, **rec})
    run_dir.log_metrics({"stage": stage, "final": True, **results})
    return True


def say_written(stage: str, path, results: dict) -> None:
    print(f"{stage}: wrote {path}  " + "  ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in results.items()))
