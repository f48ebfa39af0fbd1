"""What every entry point shares: a ProjectError becomes one stderr line and its exit code
(2 for bad input, 1 for a run that failed); one parser whose bad command lines end the same way;
the config arguments of the scripts that build a run; the checks of the files and folders a
command line names as outputs.

Imports nothing heavy (no torch, torchvision, timm, W&B or matplotlib): `--help` and a bad command
line answer at once, and each script imports those only on the path that uses them.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

import _paths  # noqa: F401

from configs.errors import ProjectError, UsageError


def run_main(main: Callable[[], int | None]) -> None:
    try:
        code = main()
    except ProjectError as e:
        _fail(e)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:  # output piped into `head` and closed early
        sys.stderr.close()
        sys.exit(0)
    except OSError as e:  # a full disk or read-only folder no writer turned into its own line
        from data.files import is_write_fault, machine_fault  # (data imports torch: only on this path)

        if not is_write_fault(e):
            raise
        _fail(machine_fault(e))
    sys.exit(code or 0)


def _fail(e: ProjectError) -> None:
    line = f"error: {capped(str(e))}"
    # Under several processes every rank fails the same way; one line is enough.
    if os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr, flush=True)
    _tell_torchrun(line)
    sys.exit(e.exit_code)


ECHO_LIMIT = 2000  # characters of an error line; a 10 MB config value is not read back whole


def capped(message: str, limit: int = ECHO_LIMIT) -> str:
    """`message`, its middle left out when it is over `limit` characters (a huge value or file it quotes):
    the start says what is wrong, the end usually what to do."""
    if len(message) <= limit:
        return message
    head, tail = limit * 2 // 3, limit // 4
    return f"{message[:head]} ... [{len(message) - head - tail:,} characters left out] ... {message[-tail:]}"


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


def parse_script_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """`parser.parse_args`, with options and positional arguments in any order, and an unknown
    option answered with what was most likely meant."""
    argv = sys.argv[1:] if argv is None else list(argv)
    unknown = _unknown_arguments(parser, argv)
    if unknown:
        raise UsageError(_unknown_option(parser, unknown[0], argv))
    return parser.parse_intermixed_args(argv)


def _unknown_arguments(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """The arguments `parser` does not know, looked for before the required ones are: a mistyped
    `--chekpoint X` is answered with what it meant, not with `--checkpoint is required`."""
    required = [action for action in parser._actions if action.required]
    for action in required:
        action.required = False
    try:
        return parser.parse_known_intermixed_args(argv)[1]
    finally:
        for action in required:
            action.required = True


def config_parser(doc: str) -> argparse.ArgumentParser:
    """A parser with the config arguments every run-building script takes: --config FILE,
    section.key=value overrides (anywhere on the line) and --device (runtime.device)."""
    parser = script_parser(doc)
    parser.add_argument("--config", help="TOML config file (see configs/)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="same as runtime.device=...")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="override config keys")
    return parser


def parse_config_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    args = parse_script_args(parser, argv)
    if args.config and "=" in args.config and not os.path.exists(args.config):  # `--config key=value ...`
        raise UsageError(f"--config takes a TOML file, not the override {args.config!r}: "
                         f"--config FILE {args.config}")
    if args.device:
        args.overrides.append(f"runtime.device={args.device}")
    return args


def _unknown_option(parser: argparse.ArgumentParser, option: str, argv: list[str]) -> str:
    """What `--epochs 3` (timm's train.py habit) or `--confg` most likely meant."""
    options = [o for action in parser._actions for o in action.option_strings if o.startswith("--")]
    if not option.startswith("-"):
        return f"unexpected argument {option!r} (see {parser.prog} --help)"
    takes_keys = any(action.dest == "overrides" for action in parser._actions)
    name, _, value = option.partition("=")
    if takes_keys:
        from configs.schema import all_keys

        if not value and option in argv:
            following = argv[argv.index(option) + 1:argv.index(option) + 2]
            value = following[0] if following and not following[0].startswith("-") and "=" not in following[0] else ""
        bare = name.lstrip("-").replace("-", "_").lower()
        keys = [k for k in all_keys() if k.split(".", 1)[1] == bare]
        if keys:
            meant = " or ".join(f"{k}={value or 'VALUE'}" for k in keys)
            return f"unknown option {name}: config keys are set as section.key=value, e.g. {meant}"
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.7)
    if close:
        return f"unknown option {name}; did you mean {close[0]}?"
    if not takes_keys:
        return f"unknown option {name} (options: {', '.join(options)}; see {parser.prog} --help)"
    return (f"unknown option {name} (options: {', '.join(options)}); config keys are set as section.key=value, "
            f"listed by `python launch/train.py --keys`")


# ----------------------------------------------------------------------------------------------
# Outputs named on the command line, checked before any work


# What a folder option is often given by mistake: the name of a file the folder will hold.
_FILE_SUFFIXES = frozenset((".csv", ".json", ".jsonl", ".png", ".jpg", ".jpeg", ".svg", ".pdf", ".onnx",
                            ".safetensors", ".pt", ".pth", ".bin", ".toml", ".txt", ".tar", ".zip", ".gz"))


def output_file(named: str, option: str, suffixes: tuple[str, ...]) -> tuple[str, str]:
    """(the file to write, a note for the user or ""): a name without an extension gets the first
    of `suffixes` (what the script writes); another extension, or an existing folder, is refused
    in one line. The note goes out after the work, beside the script's own `wrote` line, so a
    command refused later on still prints only its one error line."""
    path = Path(named).expanduser()
    kinds = " or ".join(suffixes)
    if path.is_dir():
        raise UsageError(f"{option} {named} is a folder; name a {kinds} file in it, e.g. {option} "
                         f"{path / ('out' + suffixes[0])}")
    if not path.suffix:
        return named + suffixes[0], f"note: {option} {named} has no extension: wrote {named + suffixes[0]}"
    if path.suffix.lower() not in suffixes:
        raise UsageError(f"{option} {named}: name a {kinds} file")
    return named, ""


def output_folder(named: str, option: str) -> None:
    """A folder option (--out-dir, export's --out) refuses, in one line, an existing file and a
    name that looks like a file the folder would hold (`--out model.onnx`)."""
    path = Path(named).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {named} is a file; {option} names a folder")
    if path.suffix.lower() in _FILE_SUFFIXES:
        raise UsageError(f"{option} {named} names a folder, not a {path.suffix} file: give a folder name, e.g. "
                         f"{option} {path.with_suffix('')}")
