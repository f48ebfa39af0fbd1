"""What every entry point shares: a ProjectError becomes one stderr line and its exit code
(2 for bad input, 1 for a run that failed); the config arguments of the scripts that build a run."""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
import time
from typing import Callable

import _paths  # noqa: F401

from configs.errors import ProjectError, UsageError


def run_main(main: Callable[[], int | None]) -> None:
    try:
        code = main()
    except ProjectError as e:
        # Under several processes every rank fails the same way; one line is enough.
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr, flush=True)
        _tell_torchrun(f"error: {e}")
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:  # output piped into `head` and closed early
        sys.stderr.close()
        sys.exit(0)
    sys.exit(code or 0)


def _tell_torchrun(line: str) -> None:
    """Under `accelerate launch` with several processes, torchrun ends with a failure table whose
    "Root Cause" shows what the failed rank wrote to its error file: put the one line there, so it
    is also the last thing the user reads, under the launcher's own traceback. (With one process,
    `accelerate launch -q` drops the launcher's traceback.)"""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(path, "w") as f:
            json.dump({"message": line, "timestamp": int(time.time())}, f)
    except OSError:
        pass  # the table then says what it said before


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad command line ends like any bad input: one `error:` line, exit 2."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def script_parser(doc: str) -> argparse.ArgumentParser:
    """A parser whose help is the script's docstring and whose errors are one `error:` line."""
    return _OneLineParser(description=doc.split("\n")[0], epilog=doc,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def config_parser(doc: str) -> argparse.ArgumentParser:
    """A parser with the config arguments every run-building script takes: --config FILE,
    section.key=value overrides (anywhere on the line) and --device (runtime.device)."""
    parser = script_parser(doc)
    parser.add_argument("--config", help="TOML config file (see configs/)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="same as runtime.device=...")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="override config keys")
    return parser


def parse_config_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else list(argv)
    args, unknown = parser.parse_known_intermixed_args(argv)
    if unknown:
        raise UsageError(_unknown_option(parser, unknown[0], argv))
    if args.config and "=" in args.config and not os.path.exists(args.config):  # `--config key=value ...`
        raise UsageError(f"--config takes a TOML file, not the override {args.config!r}: "
                         f"--config FILE {args.config}")
    if args.device:
        args.overrides.append(f"runtime.device={args.device}")
    return args


def _unknown_option(parser: argparse.ArgumentParser, option: str, argv: list[str]) -> str:
    """What `--epochs 3` (timm's train.py habit) or `--confg` most likely meant."""
    from configs.schema import all_keys

    name, _, value = option.partition("=")
    if not value and option in argv:
        following = argv[argv.index(option) + 1:argv.index(option) + 2]
        value = following[0] if following and not following[0].startswith("-") and "=" not in following[0] else ""
    bare = name.lstrip("-").replace("-", "_").lower()
    keys = [k for k in all_keys() if k.split(".", 1)[1] == bare]
    if keys:
        meant = " or ".join(f"{k}={value or 'VALUE'}" for k in keys)
        return f"unknown option {name}: config keys are set as section.key=value, e.g. {meant}"
    options = [o for action in parser._actions for o in action.option_strings if o.startswith("--")]
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.7)
    if close:
        return f"unknown option {name}; did you mean {close[0]}?"
    return (f"unknown option {name} (options: {', '.join(options)}); config keys are set as section.key=value, "
            f"listed by `python launch/train.py --keys`")
