"""Stage 2: train the `reward` LoRA adapter and its score head with TRL's RewardTrainer.

    marl reward --config configs/reward.yaml [--key value ...]

Loads the same base as a sequence classifier (one label), trains a SEQ_CLS LoRA
whose score head is saved with the adapter (peft `modules_to_save`), on
`chosen` / `rejected` pairs with an explicit or implicit prompt. Reports the
accuracy on held-out pairs and writes RUN_DIR/adapters/reward.

TRL appends the EOS token to every text, and transformers' sequence classifier
reads the score at the last token that is not the pad token: the EOS, or the
token before it when the pad token is the EOS (GPT-2, Qwen2.5 base).
`compute_reward_score` / `score_texts` build texts the same way and read the
score at that same token (`marl.model.reward_token_index`; docs/known-issues.md).
"""

from __future__ import annotations

import time

from marl import dist
from marl.config import RewardArgs, config_to_dict
from marl.data import check_chat_template
from marl.errors import MarlError
from marl.io import atomic_dir, atomic_write_json
from marl.model import ADAPTER_META, base_fingerprint, load_base, load_tokenizer

from .common import guard_checkpoints, log_training, say_written, start_stage, trainer_kwargs


def run(cfg: RewardArgs) -> dict:
    start = start_stage(cfg, "reward")
    if isinstance(start, dict):  # up to date: its recorded results
        return start
    with start.run_dir.writing("reward", hold=dist.is_main()):  # one writing process per run folder
        return _train(cfg, start)


def _train(cfg, start) -> dict:
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    run_dir, train, eval_ds, path = start.run_dir, start.train, start.eval, start.model_path
    fingerprint = base_fingerprint(path)
    run_dir.check_base(cfg.model_name_or_path, fingerprint)
    tokenizer = load_tokenizer(path, cfg.trust_remote_code, padding_side="right", chat_template=cfg.chat_template)
    check_chat_template(train, tokenizer, cfg.dataset_name)
    model = load_base(path, model_class=AutoModelForSequenceClassification, num_labels=1,
                      pad_token_id=tokenizer.pad_token_id, **cfg.load_kwargs())

    lora = cfg.lora_config(task_type="SEQ_CLS")
    lora.modules_to_save = ["score"]
    args = RewardConfig(**trainer_kwargs(cfg, run_dir, "reward"), eval_strategy="no",
                        center_rewards_coefficient=cfg.center_rewards_coefficient)
    trainer = RewardTrainer(model=model, args=args, train_dataset=train, eval_dataset=eval_ds,
                            processing_class=tokenizer, peft_config=lora)
    for what, ds in (("training", trainer.train_dataset), ("held-out", trainer.eval_dataset)):
        if ds is not None and len(ds) == 0:  # TRL drops pairs longer than max_length
            raise MarlError(f"every {what} pair is longer than max_length={cfg.max_length} tokens: raise --max_length")
    guard_checkpoints(trainer)
    if cfg.quantization in ("4bit", "8bit"):
        # TRL casts the trainable weights of a quantized model to bf16 (the QLoRA recipe); the score head
        # then meets hidden states in the compute dtype and fails. Keep trainable weights in that dtype.
        import torch

        compute = getattr(torch, cfg.bnb_4bit_compute_dtype) if cfg.quantization == "4bit" else torch.float32
        for p in trainer.model.parameters():
            if p.requires_grad:
                p.data = p.data.to(compute)
    if dist.is_main():
        run_dir.log_metrics({"stage": "reward", "config": config_to_dict(cfg)})
    t0 = time.time()
    out = trainer.train(resume_from_checkpoint=start.resume_from)
    results = {"train_seconds": round(time.time() - t0, 1), "train_loss": out.training_loss}
    if eval_ds is not None:
        ev = trainer.evaluate()
        results.update({"eval_accuracy": ev.get("eval_accuracy"), "eval_margin": ev.get("eval_margin"),
                        "eval_pairs": len(eval_ds)})
    if not log_training("reward", run_dir, trainer, results):
        return results
    peft_model = trainer.model
    peft_model.peft_config["default"].base_model_name_or_path = cfg.model_name_or_path
    with atomic_dir(run_dir.adapter(cfg.adapter_name), overwrite=cfg.overwrite or cfg.resume) as tmp:
        peft_model.save_pretrained(str(tmp), safe_serialization=True)
        atomic_write_json(tmp / ADAPTER_META, {
            "name": cfg.adapter_name, "role": "reward", "base_model": cfg.model_name_or_path,
            "base_fingerprint": fingerprint, "stage": "reward", "results": results,
            "eos_appended": True,
        })
    run_dir.record_stage("reward", cfg.model_name_or_path, fingerprint, config_to_dict(cfg), results)
    say_written("reward", run_dir.adapter(cfg.adapter_name), results)
    return results
