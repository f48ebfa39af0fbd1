"""What every entry point shares: a ProjectError becomes one stderr line and its exit code
(2 for bad input, 1 for a run that failed); the config arguments of the scripts that build a run."""

from __future__ import annotations

import argparse
import os
import sys
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
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:  # output piped into `head` and closed early
        sys.stderr.close()
        sys.exit(0)
    sys.exit(code or 0)


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
