"""The `marl` command: one sub-command per stage and per way of using a run.

    marl sft    --config configs/sft.yaml    [--key value ...]
    marl reward --config configs/reward.yaml [--key value ...]
    marl ppo    --config configs/ppo.yaml    [--key value ...]

Bad input ends in one line on stderr (`marl: error: ...`) and exit code 2.
"""

from __future__ import annotations

import logging
import os
import sys

USAGE = """usage: marl COMMAND [options]

stages (each reads a YAML config; any key can be overridden with --key value):
  sft     --config configs/sft.yaml       train the sft adapter (TRL SFTTrainer + LoRA)
  reward  --config configs/reward.yaml    train the reward adapter + score head (TRL RewardTrainer)
  ppo     --config configs/ppo.yaml       train several PPO policies side by side on one base

using a run:
  eval      RUN_DIR                                  reward / KL / samples per adapter, side by side
  generate  RUN_DIR --adapter NAME [...] --prompt T  several adapters answer in one batch
  merge     RUN_DIR --adapter NAME --out DIR         fuse an adapter into a plain transformers model
  push      RUN_DIR --adapter NAME --repo-id U/N     upload an adapter (+ heads, model card) to the Hub

`marl COMMAND --help` lists every option of that command.
"""


def _stage(name: str, argv: list[str]) -> int:
    from .config import STAGES, describe, load_config

    cls = STAGES[name]
    if "-h" in argv or "--help" in argv:
        print(f"usage: marl {name} [--config FILE] [--key value ...]\n\n{cls.__doc__}\n\nkeys:\n{describe(cls)}")
        return 0
    config = None
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            from .errors import MarlError

            raise MarlError("--config needs a file: --config configs/NAME.yaml")
        config = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
    cfg = load_config(cls, config, argv)
    import importlib

    importlib.import_module(f"pipelines.{name}").run(cfg)
    return 0


def _command(name: str, argv: list[str]) -> int:
    """eval / generate / merge / push live in marl.commands, each `NAME_command(argv) -> int`."""
    from . import commands

    return getattr(commands, f"{name}_command")(argv)


COMMANDS = {"sft": _stage, "reward": _stage, "ppo": _stage,
            "eval": _command, "generate": _command, "merge": _command, "push": _command}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"marl: error: unknown command {cmd!r}: use one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    from .errors import MarlError

    try:
        return COMMANDS[cmd](cmd, rest)
    except MarlError as e:
        print(f"marl: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("marl: interrupted; finished adapters and checkpoints are kept (resume with --resume true)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
