"""List and search the backbone names `model.name` accepts.

    python launch/list_models.py --search 'resnet*'          # timm, torchvision and ours
    python launch/list_models.py --search 'torchvision/*'    # one library
    python launch/list_models.py --check timm/regnety_016    # exit 2 with close matches if unknown
"""

from __future__ import annotations

from cli import parse_script_args, run_main, script_parser


def main() -> int:
    parser = script_parser(__doc__)
    parser.add_argument("--search", default="*", help="shell-style pattern, e.g. 'regnet*' or 'timm/vit_*'")
    parser.add_argument("--check", metavar="NAME", help="say whether NAME resolves")
    args = parse_script_args(parser)
    from models import available_models, check_model_name

    if args.check:
        check_model_name(args.check)
        print(f"{args.check}: ok")
        return 0
    names = available_models(args.search)
    print("\n".join(names))
    print(f"{len(names)} model(s) match '{args.search}'")
    return 0


if __name__ == "__main__":
    run_main(main)
