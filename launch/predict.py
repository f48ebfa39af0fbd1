"""Predict classes for images with a trained checkpoint; one CSV row per image.

    python launch/predict.py --checkpoint runs/demo/best.safetensors photos/ --out preds.csv
    python launch/predict.py --checkpoint RUN/best.safetensors a.jpg b.png --top-k 3 --tta
    # the dog-breeds Kaggle submission (Id = file name, Class = class index)
    python launch/predict.py --checkpoint RUN/best.safetensors dogImages/Test --kaggle --out submission.csv
    # on a GPU, more loader workers
    python launch/predict.py --checkpoint RUN/best.safetensors photos/ --device cuda --num-workers 8

Columns: path, class, probability, top_k ("name:prob;name:prob;..."), error. A file that does not
decode gets an empty prediction and its error (the run never stops on one); they are also listed on
stderr. The CSV is written to a temporary file and renamed, so it is never half-written.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

from cli import run_main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--checkpoint", required=True, help="a .safetensors checkpoint written by training")
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER")
    parser.add_argument("--out", default="preds.csv", help="CSV file to write (default: preds.csv)")
    parser.add_argument("--top-k", type=int, default=5, help="classes listed per image (default: 5)")
    parser.add_argument("--kaggle", action="store_true", help="write `Id,Class` (file name, class index)")
    parser.add_argument("--tta", action="store_true", help="average with the horizontally flipped image")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    return parser.parse_args(argv)


def write_csv_atomically(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def main() -> int:
    args = parse_args()
    from trainer.model_file import load_classifier
    from configs.errors import UsageError
    from trainer.inference import collect_images, pick_device, predict_files

    if args.top_k < 1 or args.batch_size < 1 or args.num_workers < 0:
        raise UsageError("--top-k and --batch-size must be at least 1, --num-workers 0 or more")
    device = pick_device(args.device)
    loaded = load_classifier(args.checkpoint)
    paths = collect_images(args.inputs)
    preds = predict_files(loaded, paths, batch_size=args.batch_size, num_workers=args.num_workers, device=device,
                          tta_flip=args.tta)
    names = loaded.class_names
    k = min(args.top_k, len(names))
    rows = []
    for i, path in enumerate(paths):
        if i in preds.errors:
            rows.append([path.name, ""] if args.kaggle else [str(path), "", "", "", preds.errors[i]])
            continue
        top = preds.probs[i].topk(k)
        best = top.indices[0].item()
        if args.kaggle:
            rows.append([path.name, best])
        else:
            listing = ";".join(f"{names[c]}:{p:.4f}" for p, c in zip(top.values.tolist(), top.indices.tolist()))
            rows.append([str(path), names[best], f"{top.values[0].item():.6f}", listing, ""])
    header = ["Id", "Class"] if args.kaggle else ["path", "class", "probability", f"top{k}", "error"]
    out = Path(args.out)
    write_csv_atomically(out, header, rows)
    print(f"wrote {out}: {len(paths) - len(preds.errors)} prediction(s) from {args.checkpoint} on {device}"
          + (" with flip TTA" if args.tta else ""))
    if preds.errors:
        print(f"warning: {len(preds.errors)} file(s) could not be read and have no prediction:", file=sys.stderr)
        for i, problem in sorted(preds.errors.items()):
            print(f"  {paths[i]}: {problem}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_main(main)
