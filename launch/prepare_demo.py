"""Write the demo dataset (scikit-learn's 1,797 handwritten digits) as an image folder.

    python launch/prepare_demo.py datasets/digits
"""

from __future__ import annotations

import argparse

from cli import run_main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dest", nargs="?", default="datasets/digits")
    args = parser.parse_args()
    from data.demo_digits import write_digits_folder

    path = write_digits_folder(args.dest)
    print(f"demo images in {path}")
    return 0


if __name__ == "__main__":
    run_main(main)
