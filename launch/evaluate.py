"""Evaluate a checkpoint on a labelled folder (one folder per class, named as in training).

    python launch/evaluate.py --checkpoint runs/demo/best.safetensors datasets/digits_test
    python launch/evaluate.py --checkpoint RUN/best.safetensors hymenoptera_data/val --out-dir RUN/eval --tta
    python launch/evaluate.py --checkpoint RUN/best.safetensors FOLDER --device cuda --num-workers 8

Prints accuracy and per-class precision / recall / F1, and writes to --out-dir (default: an `eval`
folder beside the checkpoint) metrics.json, confusion_matrix.png and top_losses.png: the images
the model got wrong most confidently, titled "actual / predicted (probability)".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cli import run_main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("folder", help="a folder of class folders")
    parser.add_argument("--out-dir", help="where the report goes (default: CHECKPOINT_DIR/eval)")
    parser.add_argument("--top-losses", type=int, default=16, help="images in the top-losses grid")
    parser.add_argument("--tta", action="store_true", help="average with the horizontally flipped image")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--device", default="auto")
    return parser.parse_args(argv)


def labelled_files(folder: Path, class_names: list[str]) -> tuple[list[Path], list[int]]:
    from data.folders import list_images
    from configs.errors import UsageError

    if not folder.is_dir():
        raise UsageError(f"not a folder: {folder}")
    subdirs = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    unknown = [d.name for d in subdirs if d.name not in class_names]
    if unknown:
        raise UsageError(f"class folder(s) {', '.join(unknown[:5])} in {folder} are not classes of this checkpoint "
                         f"({', '.join(class_names[:8])}{'...' if len(class_names) > 8 else ''})")
    paths, labels = [], []
    for d in subdirs:
        for p in list_images(d):
            paths.append(p)
            labels.append(class_names.index(d.name))
    if not paths:
        raise UsageError(f"no labelled images in {folder}: expected {folder}/<class name>/<image files>")
    return paths, labels


def plot_confusion(cm, class_names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(class_names)
    size = max(4.0, 0.45 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), class_names, rotation=90, fontsize=8)
    ax.set_yticks(range(n), class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    if n <= 30:
        top = max(max(row) for row in cm) or 1
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(cm[i][j]), ha="center", va="center", fontsize=7,
                        color="white" if cm[i][j] > top / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_top_losses(items: list[tuple[Path, str, str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from data.images import load_rgb

    cols = min(4, max(1, len(items)))
    rows = max(1, -(-len(items) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image_path, actual, predicted, prob) in zip(axes.flat, items):
        ax.imshow(load_rgb(str(image_path)).permute(1, 2, 0).numpy())
        ax.set_title(f"{actual} / {predicted} ({prob:.2f})", fontsize=9, color="red")
    if not items:
        axes.flat[0].text(0.5, 0.5, "no mistakes", ha="center", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    args = parse_args()
    import torch

    from trainer.model_file import load_classifier
    from trainer.inference import pick_device, predict_files
    from trainer.metrics import classification_report

    device = pick_device(args.device)
    loaded = load_classifier(args.checkpoint)
    names = loaded.class_names
    paths, labels = labelled_files(Path(args.folder).expanduser(), names)
    preds = predict_files(loaded, paths, batch_size=args.batch_size, num_workers=args.num_workers, device=device,
                          tta_flip=args.tta)
    ok = preds.ok
    y_true = torch.tensor(labels)[ok]
    probs = preds.probs[ok]
    y_pred = probs.argmax(1)
    report = classification_report(y_true, y_pred, names)
    report |= {"checkpoint": str(args.checkpoint), "folder": str(args.folder), "tta": args.tta,
               "unreadable": [str(paths[i]) for i in sorted(preds.errors)]}

    out_dir = Path(args.out_dir) if args.out_dir else Path(args.checkpoint).parent / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=2))
    plot_confusion(report["confusion_matrix"], names, out_dir / "confusion_matrix.png")
    # Top losses (fastai's name): the mistakes with the highest loss, i.e. least probability on the truth.
    good_paths = [p for p, keep in zip(paths, ok.tolist()) if keep]
    wrong = (y_pred != y_true).nonzero().flatten().tolist()
    wrong.sort(key=lambda i: probs[i, y_true[i]].item())
    plot_top_losses([(good_paths[i], names[y_true[i]], names[y_pred[i]], probs[i, y_pred[i]].item())
                     for i in wrong[: args.top_losses]], out_dir / "top_losses.png")

    width = max(len(n) for n in names)
    print(f"accuracy {report['accuracy']:.4f} on {report['images']} images, macro F1 {report['macro_f1']:.4f}")
    print(f"{'class':<{width}}  precision  recall      f1  support")
    for name, m in report["per_class"].items():
        print(f"{name:<{width}}  {m['precision']:>9.4f}  {m['recall']:>6.4f}  {m['f1']:>6.4f}  {m['support']:>7d}")
    print(f"wrote {out_dir / 'metrics.json'}, {out_dir / 'confusion_matrix.png'}, {out_dir / 'top_losses.png'}")
    if preds.errors:
        print(f"warning: {len(preds.errors)} unreadable file(s) left out:", file=sys.stderr)
        for i in sorted(preds.errors):
            print(f"  {paths[i]}: {preds.errors[i]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_main(main)
