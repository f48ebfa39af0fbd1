"""Audit an image folder before training: decode every file, report what is wrong, optionally move it away.

    # check a folder (either layout: class folders, or train/ val/ (test/) split folders)
    python launch/audit.py datasets/pets
    # the sizes and split your training config uses (too-small threshold, the class-folder split)
    python launch/audit.py datasets/pets --val-fraction 0.15 --seed 1999
    # one row per problem file, for a spreadsheet or a script (.csv) or everything (.json)
    python launch/audit.py datasets/pets --report pets-audit.csv
    # move bad files (and extra copies of duplicates) out of the way, keeping their relative paths
    python launch/audit.py datasets/pets --quarantine datasets/pets-quarantine
    # a lower decompression-bomb limit, fewer worker processes, ignore the cache
    python launch/audit.py datasets/pets --max-pixels 50000000 --workers 4 --no-cache

Training runs the same audit automatically (cached, so only new or changed files are decoded)
and leaves out the files listed here; `data.audit=off` skips it. Nothing is ever deleted.

Exit code: 0 no problems, 1 problems found (listed), 2 bad arguments.
"""

from __future__ import annotations

import argparse

from cli import output_file, parse_script_args, run_main, script_parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    parser.add_argument("root", help="data root: a folder of class folders, or one with train/ and val/")
    parser.add_argument("--min-side", type=int, default=0,
                        help="images with a smaller side are too small (default 0: only degenerate ones, a side "
                             "under 8 px or one side over 25x the other)")
    parser.add_argument("--max-pixels", type=int, default=None,
                        help="decompression-bomb limit in pixels (default: PIL's, about 89.5 million; 0: none)")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="class-folder layout: validation share")
    parser.add_argument("--seed", type=int, default=0, help="class-folder layout: split seed")
    parser.add_argument("--report", help="write the problems here: .json (whole audit) or .csv (one row per file); "
                                         "no extension: .json")
    parser.add_argument("--quarantine", metavar="DIR", help="move problem files here, keeping relative paths")
    parser.add_argument("--workers", type=int, default=0, help="decoding processes (default: every core)")
    parser.add_argument("--no-cache", action="store_true", help="decode every file again, ignoring the cache")
    parser.add_argument("--audit-dir", default="", help="where caches and reports live (default ~/.cache/imgtrain/audit)")
    return parse_script_args(parser, argv)


def main() -> int:
    from configs.errors import UsageError

    args = parse_args()
    if args.min_side < 0 or args.workers < 0:
        raise UsageError("--min-side and --workers must be 0 or more")
    if not 0.0 < args.val_fraction < 1.0:
        raise UsageError(f"--val-fraction must be between 0 and 1 (exclusive), got {args.val_fraction}")
    report, note = output_file(args.report, "--report", (".json", ".csv")) if args.report else ("", "")
    from data.audit import DEGENERATE_SIDE, audit_splits, check_quarantine_folder, quarantine
    from data.folders import discover
    from data.images import DEFAULT_MAX_PIXELS

    max_pixels = DEFAULT_MAX_PIXELS if args.max_pixels is None else args.max_pixels
    splits = discover(args.root, args.val_fraction, args.seed)
    if args.quarantine:
        check_quarantine_folder(splits.root, args.quarantine)  # before the slow part, not after it
    result = audit_splits(splits, min_side=args.min_side or DEGENERATE_SIDE, max_pixels=max_pixels,
                          audit_dir=args.audit_dir, use_cache=not args.no_cache, workers=args.workers)
    print("\n".join(result.summary_lines()))
    default_report = result.write_report(result.folder / "report.json")
    print(f"report   {result.write_report(report) if report else default_report}")
    if note:
        print(note)
    if args.quarantine and result.problems:
        moved = quarantine(result, args.quarantine)
        print(f"moved    {len(moved)} files to {args.quarantine} (relative paths kept; nothing deleted)")
    return 1 if result.problems else 0


if __name__ == "__main__":
    run_main(main)
