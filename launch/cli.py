"""What every entry point shares: a ProjectError becomes one stderr line and its exit code
(2 for bad input, 1 for a run that failed)."""

from __future__ import annotations

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
