"""Stage 3: several PPO policies trained side by side on the shared base.

    python -m pipelines.ppo --config configs/ppo.yaml [--key value ...]   (the same as `marl ppo`)

The stage itself is `marl.stages.ppo.run`; from Python: `marl.ppo(cfg)`.
"""

from marl.stages.ppo import run

__all__ = ["run"]

if __name__ == "__main__":
    import sys

    from marl.cli import main

    sys.exit(main(["ppo", *sys.argv[1:]]))
