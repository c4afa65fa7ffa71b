"""Stage 2: train the `reward` LoRA adapter and its score head (TRL RewardTrainer).

    python -m pipelines.reward --config configs/reward.yaml [--key value ...]   (the same as `marl reward`)

The stage itself is `marl.stages.reward.run`; from Python: `marl.reward(cfg)`.
"""

from marl.stages.reward import run

__all__ = ["run"]

if __name__ == "__main__":
    import sys

    from marl.cli import main

    sys.exit(main(["reward", *sys.argv[1:]]))
