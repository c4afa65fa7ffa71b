"""The `marl` command: one sub-command per stage and per way of using a run.

    marl sft    --config configs/sft.yaml    [--key value ...]
    marl reward --config configs/reward.yaml [--key value ...]
    marl ppo    --config configs/ppo.yaml    [--key value ...]

Bad input, and what the machine refuses (a full disk, a folder without permission), ends in
one line, the last on stderr (`marl: error: <what>: <how to fix>`), and exit code 2; `--debug`
or MARL_DEBUG=1 prints the traceback above it. Ctrl-C exits 130 and says whether there is a
checkpoint to resume from.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import threading
import traceback

from .config import STAGES, describe, load_config
from .errors import MarlError, close_progress_bars, from_dependency, from_environment

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

`marl COMMAND --help` lists every option of that command. Errors are one line, exit code 2;
--debug (or MARL_DEBUG=1) prints the traceback above it.
"""


def _stage(name: str, argv: list[str]) -> int:
    cls = STAGES[name]
    if "-h" in argv or "--help" in argv:
        print(f"usage: marl {name} [--config FILE] [--key value ...]\n\n{cls.__doc__}\n\nkeys:\n{describe(cls)}")
        return 0
    config = None
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise MarlError("--config needs a file: --config configs/NAME.yaml")
        config = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
    cfg = load_config(cls, config, argv)
    _context["stage"], _context["run_dir"] = name, cfg.run_dir
    importlib.import_module(f"marl.stages.{name}").run(cfg)  # each stage loads its libraries when it runs
    return 0


def _command(name: str, argv: list[str]) -> int:
    """eval / generate / merge / push live in marl.commands, each `NAME_command(argv) -> int`."""
    from . import commands  # torch and more: loaded only when a command runs, so `marl --help` is instant

    return getattr(commands, f"{name}_command")(argv)


COMMANDS = {"sft": _stage, "reward": _stage, "ppo": _stage,
            "eval": _command, "generate": _command, "merge": _command, "push": _command}
_context: dict[str, str] = {}  # the stage being run and its run_dir, for the resume hints; what was said last
_debug = False
_other_thread_hook = threading.excepthook  # what handles a thread's exception that is not the machine's


def _checkpoint() -> str | None:
    """The checkpoint `--resume true` would continue from, for the stage being run (None if none)."""
    if "stage" not in _context:
        return None
    from .run import RunDir  # torch (safetensors io): only after a stage was interrupted

    try:
        found = RunDir(_context["run_dir"]).resumable(_context["stage"])
    except (OSError, MarlError):  # no run folder to look in: nothing to resume
        return None
    return str(found) if found is not None else None


def _interrupted() -> str:
    ckpt = _checkpoint()
    if ckpt is not None:
        return (f"marl: interrupted; finished adapters and checkpoints are kept: resume from {ckpt} with "
                "--resume true")
    if "stage" in _context:
        return "marl: interrupted before the first checkpoint: nothing to resume; finished adapters are kept"
    return "marl: interrupted"


def _fail(message: str, debug: bool) -> int:
    """Print the error as the last line of stderr (after the traceback with --debug); exit code 2."""
    close_progress_bars()
    if debug:
        traceback.print_exc()
    sys.stdout.flush()
    print("marl: error: " + " ".join(message.split("\n")), file=sys.stderr, flush=True)
    _context["said"] = "error"
    return 2


def _thread_error(args) -> None:
    """`threading.excepthook`: a background writer (tensorboard's event writer) that the machine stops, e.g.
    on a full disk, is one warning line instead of a traceback, and nothing once the last line is out."""
    known = from_environment(args.exc_value) if args.exc_value is not None else None
    if known is None or _debug:  # a bug keeps its traceback
        return _other_thread_hook(args)
    if "said" not in _context:
        print(f"marl: warning: a background writer stopped: {known}", file=sys.stderr, flush=True)


def _run(cmd: str, rest: list[str], debug: bool) -> int:
    _context.clear()
    try:
        return COMMANDS[cmd](cmd, rest)
    except MarlError as e:
        return _fail(str(e), debug)
    except KeyboardInterrupt:
        close_progress_bars()
        if debug:
            traceback.print_exc()
        print(_interrupted(), file=sys.stderr, flush=True)
        _context["said"] = "interrupted"
        return 130
    except BrokenPipeError:
        raise
    except Exception as e:
        ckpt = _checkpoint()
        known = from_environment(e, f", then resume with --resume true (from {ckpt})" if ckpt else "") or \
            from_dependency(e)
        if known is None:  # not the user's input nor the machine: a bug, keep its traceback
            raise
        return _fail(str(known), debug)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    debug = "--debug" in argv or os.environ.get("MARL_DEBUG", "") not in ("", "0")
    global _debug, _other_thread_hook
    _debug = debug
    if threading.excepthook is not _thread_error:  # kept after main returns: writers may fail at exit
        _other_thread_hook, threading.excepthook = threading.excepthook, _thread_error
    argv = [a for a in argv if a != "--debug"]
    try:
        if not argv or argv[0] in ("-h", "--help", "help"):
            print(USAGE)
            code = 0
            if not argv:
                sys.stdout.flush()
                print(f"marl: error: no command given: use one of {', '.join(COMMANDS)}", file=sys.stderr)
                code = 2
        elif argv[0] not in COMMANDS:
            print(f"marl: error: unknown command {argv[0]!r}: use one of {', '.join(COMMANDS)}", file=sys.stderr)
            code = 2
        else:
            code = _run(argv[0], argv[1:], debug)
        sys.stdout.flush()
    except BrokenPipeError:
        # the reader went away (`marl sft --help | head -1`): say nothing more, and keep Python's exit-time
        # flush from raising again on the closed pipe
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return code


if __name__ == "__main__":
    sys.exit(main())
