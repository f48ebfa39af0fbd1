"""What every entry point shares: turn a UsageError into one stderr line and exit code 2."""

from __future__ import annotations

import os
import sys
from typing import Callable

import _paths  # noqa: F401

from trainer.errors import UsageError


def run_main(main: Callable[[], int | None]) -> None:
    try:
        code = main()
    except UsageError as e:
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
