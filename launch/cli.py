"""What every entry point shares: a ProjectError becomes one stderr line and its exit code
(2 for bad input, 1 for a run that failed); the config arguments of the scripts that build a run."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable

import _paths  # noqa: F401

from configs.errors import ProjectError


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


def config_parser(doc: str) -> argparse.ArgumentParser:
    """A parser with the config arguments every run-building script takes: --config FILE,
    section.key=value overrides (anywhere on the line) and --device (runtime.device)."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0], epilog=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="TOML config file (see configs/)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="same as runtime.device=...")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="override config keys")
    return parser


def parse_config_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    args = parser.parse_intermixed_args(argv)
    if args.device:
        args.overrides.append(f"runtime.device={args.device}")
    return args
