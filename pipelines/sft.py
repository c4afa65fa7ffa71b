"""Stage 1: train the `sft` LoRA adapter (TRL SFTTrainer).

    python -m pipelines.sft --config configs/sft.yaml [--key value ...]   (the same as `marl sft`)

The stage itself is `marl.stages.sft.run`; from Python: `marl.sft(cfg)`.
"""

from marl.stages.sft import run

__all__ = ["run"]

if __name__ == "__main__":
    import sys

    from marl.cli import main

    sys.exit(main(["sft", *sys.argv[1:]]))
