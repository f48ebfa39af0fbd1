"""Evaluate a checkpoint on the run's own validation or test split, or on another labelled folder.

    # the run's own validation split, rebuilt from the config the checkpoint records: gives back
    # exactly the val_acc the checkpoint recorded
    python launch/evaluate.py --checkpoint runs/demo/best.safetensors --split val
    # the labelled test/ folder of the run's data root
    python launch/evaluate.py --checkpoint RUN/best.safetensors --split test
    # the data moved since training
    python launch/evaluate.py --checkpoint RUN/best.safetensors --split val --data-root /new/place/images
    # any other folder of class folders, named as in training
    python launch/evaluate.py --checkpoint RUN/best.safetensors hymenoptera_data/val --out-dir RUN/eval --tta
    # one GPU, more loader workers
    python launch/evaluate.py --checkpoint RUN/best.safetensors --split val --device cuda:0 --num-workers 8
    # a CSV of labelled images, in the run's columns (multi-label: ';'-separated labels)
    python launch/evaluate.py --checkpoint RUN/best.safetensors --csv held_out/labels.csv
    # a Hugging Face dataset on disk: its test split (else validation), or --hf-split NAME
    python launch/evaluate.py --checkpoint RUN/best.safetensors --hf ~/datasets/beans-saved
    # tar shards written by launch/make_shards.py: their val split (or --shards-split train); a
    # shards run's own val shards are also `--split val`
    python launch/evaluate.py --checkpoint RUN/best.safetensors --shards datasets/digits-shards
    # list the likely label errors of the validation split (and their paths in label_issues.txt),
    # e.g. to look at them, fix them, or move them away:
    python launch/evaluate.py --checkpoint RUN/best.safetensors --split val --label-issues
    xargs -d '\\n' -a RUN/eval-val/label_issues.txt mv -t quarantine/   # after checking them

Images go through the checkpoint's own eval transform, in eval mode and fp32. A folder that holds
training images of the run (the same files, or copies of them) gets a warning saying how many:
its accuracy is not a held-out score. Prints accuracy and per-class precision / recall / F1, and
writes to --out-dir (default: `eval` beside the checkpoint, `eval-val` / `eval-test` for --split)
metrics.json, confusion_matrix.png and what went wrong (trainer/reporting/mistakes.py):
top_losses.png and top_losses.csv (the images the model got wrong most confidently, as it saw
them: actual / predicted, probability / loss), most_confused.csv (actual, predicted, count,
share) and label_issues.csv (cleanlab's likely label errors, image path first; meaningful on
images the model did not train on). A multi-label checkpoint gets per-class ones (its wrong
(image, class) decisions; each class's misses and false positives) and reports mAP, micro /
macro F1 and per-class precision / recall / F1 / AP at the per-class thresholds it recorded, to
metrics.json. A label the CSV or dataset names that the checkpoint
does not know is refused; rows without a label or file are left out with a note. Shards must
have the checkpoint's class list; the shards read are checked against index.json's sha256
first, and a damaged or missing one is refused (one line, exit code 2, nothing written).
--out-dir names a folder: an existing file, or a file's name such as metrics.json, is refused
before any work.
"""

from __future__ import annotations

import argparse

from cli import output_folder, parse_script_args, run_main, script_parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    parser.add_argument("--checkpoint", required=True, help="a .safetensors checkpoint written by training")
    parser.add_argument("folder", nargs="?", help="a folder of class folders (instead of --split); multi-label: "
                                                  "a folder of images with a labels.csv")
    parser.add_argument("--csv", help="a CSV of labelled images (the run's file and label columns; paths relative "
                                      "to --data-root, else to the CSV's folder); multi-label: ';'-separated labels")
    parser.add_argument("--hf", metavar="DIR", help="a Hugging Face dataset on disk (the run's image and label columns)")
    parser.add_argument("--hf-split", help="with --hf: the split to evaluate (default: test, else validation)")
    parser.add_argument("--shards", metavar="DIR", help="a folder of tar shards (launch/make_shards.py) with the "
                                                        "checkpoint's classes")
    parser.add_argument("--shards-split", choices=("val", "train"), help="with --shards: the split (default: val)")
    parser.add_argument("--split", choices=("val", "test"), help="the run's own validation split (a shards run: "
                                                                 "its val shards), or its data root's labelled "
                                                                 "test/ folder")
    parser.add_argument("--data-root", help="where the run's images are now, if not at its recorded data.root")
    parser.add_argument("--out-dir", help="the folder the report goes to (default: CHECKPOINT_DIR/eval or "
                                          "eval-SPLIT)")
    parser.add_argument("--top-losses", type=int, default=16, help="images in the top-losses grid")
    parser.add_argument("--label-issues", action="store_true", help="print the likely label errors (cleanlab) and "
                                                                    "write their paths to OUT_DIR/label_issues.txt")
    parser.add_argument("--tta", action="store_true", help="average with the horizontally flipped image")
    parser.add_argument("--batch-size", type=int, help="default: 64; the run's data.batch_size with --split")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    return parse_script_args(parser, argv)


def main() -> int:
    args = parse_args()
    if args.out_dir:
        output_folder(args.out_dir, "--out-dir")
    from trainer.inference.evaluate import evaluate_checkpoint
    from trainer.inference.predict import InferenceOptions, Listing

    options = InferenceOptions(args.batch_size, args.num_workers, args.device, args.tta)
    listing = Listing(args.csv, args.hf, args.hf_split, args.shards, args.shards_split, args.data_root)
    evaluate_checkpoint(args.checkpoint, options, folder=args.folder, split=args.split, data_root=args.data_root,
                        out_dir=args.out_dir, top_loss_count=args.top_losses, listing=listing,
                        list_label_issues=args.label_issues)
    return 0


if __name__ == "__main__":
    run_main(main)
