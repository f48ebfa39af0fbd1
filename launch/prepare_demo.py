"""Write the demo dataset (scikit-learn's 1,797 handwritten digits) as an image folder.

    python launch/prepare_demo.py datasets/digits

Written once (a second run finds it complete and does nothing). An existing folder that this script
did not write is refused, never replaced.
"""

from __future__ import annotations

from pathlib import Path

from cli import output_folder, parse_script_args, run_main, script_parser
from configs.errors import UsageError


def main() -> int:
    parser = script_parser(__doc__)
    parser.add_argument("dest", nargs="?", default="datasets/digits", help="the folder to write (default "
                                                                           "datasets/digits)")
    args = parse_script_args(parser)
    output_folder(args.dest, "dest")
    from data.demo_digits import COMPLETE_MARKER, write_digits_folder

    dest = Path(args.dest).expanduser()
    # A folder the script did not write would be replaced whole: refuse it rather than delete it.
    if dest.is_dir() and any(dest.iterdir()) and not (dest / COMPLETE_MARKER).exists():
        raise UsageError(f"{dest} exists and is not a demo folder this script wrote; name a new folder")
    path = write_digits_folder(dest)
    print(f"demo images in {path}")
    return 0


if __name__ == "__main__":
    run_main(main)
