"""Stage 1: train the `sft` LoRA adapter on the shared base with TRL's SFTTrainer.

    marl sft --config configs/sft.yaml [--key value ...]

Loads the base once (full precision, bf16, 8-bit or 4-bit: QLoRA), adds a LoRA
adapter named `sft`, trains it on `text` / `messages` / `prompt`+`completion`
data, and writes RUN_DIR/adapters/sft (peft format). Held-out loss before and
after training goes to RUN_DIR/metrics.jsonl and the manifest.
"""

from __future__ import annotations

import math
import time

from marl import dist
from marl.config import SFTArgs, config_to_dict
from marl.data import check_chat_template
from marl.model import MultiAdapterModel

from .common import guard_checkpoints, log_training, say_written, start_stage, trainer_kwargs


def run(cfg: SFTArgs) -> dict:
    start = start_stage(cfg, "sft", cfg.dataset_text_field)
    if isinstance(start, dict):  # up to date: its recorded results
        return start
    with start.run_dir.writing("sft", hold=dist.is_main()):  # one writing process per run folder
        return _train(cfg, start)


def _train(cfg, start) -> dict:
    from trl import SFTConfig, SFTTrainer

    run_dir, train, eval_ds = start.run_dir, start.train, start.eval
    model = MultiAdapterModel.from_pretrained(cfg.model_name_or_path, **cfg.model_kwargs())
    run_dir.check_base(model.base_name, model.fingerprint)
    check_chat_template(train, model.tokenizer, cfg.dataset_name)
    model.add_adapter(cfg.adapter_name, cfg.lora_config(), role="sft")
    model.set_adapter(cfg.adapter_name)
    model.tokenizer.padding_side = "right"

    args = SFTConfig(**trainer_kwargs(cfg, run_dir, "sft"), dataset_text_field=cfg.dataset_text_field,
                     packing=cfg.packing, eval_strategy="no")
    trainer = SFTTrainer(model=model.peft, args=args, train_dataset=train, eval_dataset=eval_ds,
                         processing_class=model.tokenizer)
    guard_checkpoints(trainer)
    model.set_trainable([cfg.adapter_name])  # TRL may touch requires_grad; only this adapter trains
    if dist.is_main():
        run_dir.log_metrics({"stage": "sft", "config": config_to_dict(cfg)})
    results = {}
    if eval_ds is not None:
        with model.use_adapter(None):
            results["eval_loss_base"] = trainer.evaluate()["eval_loss"]
        # evaluate() marks the model as prepared by accelerate; left so, train() would skip the DDP wrap
        # and processes would train apart under `accelerate launch`
        if hasattr(model.peft, "_is_accelerate_prepared"):
            del model.peft._is_accelerate_prepared
    t0 = time.time()
    out = trainer.train(resume_from_checkpoint=start.resume_from)
    results["train_seconds"] = round(time.time() - t0, 1)
    results["train_loss"] = out.training_loss
    if eval_ds is not None:
        results["eval_loss"] = trainer.evaluate()["eval_loss"]
        results["eval_perplexity"] = math.exp(min(results["eval_loss"], 50))
    if not log_training("sft", run_dir, trainer, results):
        return results
    model.save_adapter(cfg.adapter_name, run_dir.adapter(cfg.adapter_name), overwrite=cfg.overwrite or cfg.resume,
                       extra_meta={"stage": "sft", "results": results})
    run_dir.record_stage("sft", model.base_name, model.fingerprint, config_to_dict(cfg), results)
    say_written("sft", run_dir.adapter(cfg.adapter_name), results)
    return results
