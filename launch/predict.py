"""Predict classes for images with a trained checkpoint; one CSV row per image.

    # CPU (or the GPU, when one is visible)
    python launch/predict.py --checkpoint runs/demo/best.safetensors photos/ --out preds.csv
    python launch/predict.py --checkpoint RUN/best.safetensors a.jpg b.png --top-k 3 --tta
    # a Kaggle submission from a folder of test images: Id = file name without extension, Class = class name
    python launch/predict.py --checkpoint RUN/best.safetensors test_images/ --kaggle --out submission.csv
    # one GPU, more loader workers
    python launch/predict.py --checkpoint RUN/best.safetensors photos/ --device cuda:0 --num-workers 8
    # several GPUs or machines: split the inputs and run one predict.py per GPU (CUDA_VISIBLE_DEVICES=N)
    # every image a CSV lists (Kaggle's test ids), or a Hugging Face dataset's test split
    python launch/predict.py --checkpoint RUN/best.safetensors --csv dog-breed/sample_submission.csv \\
        --data-root dog-breed/test --kaggle --out submission.csv
    # one probability column per class, in the order (and with the id column) of Kaggle's sample submission
    python launch/predict.py --checkpoint RUN/best.safetensors --csv dog-breed/sample_submission.csv \\
        --data-root dog-breed/test --kaggle-probabilities --sample-submission dog-breed/sample_submission.csv \\
        --out submission.csv
    python launch/predict.py --checkpoint RUN/best.safetensors --hf ~/datasets/beans-saved --hf-split test
    # every sample of a tar shards folder's val split (or --shards-split train); `path` is each
    # sample's SHARD.tar#KEY, the member KEY.<ext> of that tar
    python launch/predict.py --checkpoint RUN/best.safetensors --shards datasets/digits-shards --out preds.csv
    # a multi-label checkpoint (data.task = multilabel) writes path, labels, scores_topK, error
    python launch/predict.py --checkpoint RUN/best.safetensors photos/ --out tags.csv

Every image goes through the checkpoint's own eval transform (its recorded preprocessing: size,
normalization and the crop mode of the run's data.augment preset), as in the run's validation.
Columns: path, class, probability, top_k ("name:prob;name:prob;..."), error. A file that does not
decode gets an empty prediction and its error (the run never stops on one); they are also listed on
stderr. The CSV is written to a temporary file and renamed, so it is never half-written. Shards
are checked against index.json's sha256 first: a damaged or missing one ends in one line, exit
code 2, nothing written.
A multi-label checkpoint's CSV has `labels`: every class whose sigmoid score reaches that class's
threshold (chosen on the run's validation split, recorded in the checkpoint; 0.5 when none),
';'-separated, highest first, and may be empty.

--kaggle writes a submission instead: one row per image, its id and its predicted class by name
(as the data names it: a class "2" is written 2, whichever position it sorts to). The id is the
--csv row's file cell as written (else the file name without extension; a shard sample's key).
The columns are named as the CSV's own (the run's data.csv_file_column and data.csv_label_column)
when predicting from --csv, else `Id,Class`; --sample-submission FILE names them by its header.
--kaggle-label index writes the class's index in the checkpoint's sorted class list instead (the
old form). --kaggle-probabilities writes one probability column per class (header: the class
names, or the sample submission's order, whose class columns must be the checkpoint's classes);
multi-label checkpoints write their per-class scores this way and refuse the one-label form.
--out without an extension gets .csv.
"""

from __future__ import annotations

import argparse

from cli import output_file, parse_script_args, run_main, script_parser
from configs.errors import UsageError

KAGGLE_LABELS = ("name", "index")  # trainer.inference.predict.KAGGLE_LABELS, without importing torch for --help


def parse_args(argv=None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    parser.add_argument("--checkpoint", required=True, help="a .safetensors checkpoint written by training")
    parser.add_argument("inputs", nargs="*", metavar="IMAGE_OR_FOLDER")
    parser.add_argument("--csv", help="predict every image a CSV lists (the run's file column; paths relative to "
                                      "--data-root, else to the CSV's folder)")
    parser.add_argument("--data-root", help="with --csv: the folder its paths are relative to")
    parser.add_argument("--hf", metavar="DIR", help="predict a Hugging Face dataset on disk (the run's image column)")
    parser.add_argument("--hf-split", help="with --hf: the split (default: test, else validation)")
    parser.add_argument("--shards", metavar="DIR", help="predict every sample of a tar shards folder "
                                                        "(launch/make_shards.py)")
    parser.add_argument("--shards-split", choices=("val", "train"), help="with --shards: the split (default: val)")
    parser.add_argument("--out", default="preds.csv", help="CSV file to write (default: preds.csv; no extension: "
                                                           ".csv added)")
    parser.add_argument("--top-k", type=int, default=5, help="classes listed per image (default: 5)")
    parser.add_argument("--kaggle", action="store_true", help="write a Kaggle submission: id, predicted class name")
    parser.add_argument("--kaggle-label", choices=KAGGLE_LABELS, help="with --kaggle: the class by name (default) "
                                                                      "or by its index in the sorted class list")
    parser.add_argument("--kaggle-probabilities", action="store_true",
                        help="write a Kaggle submission of one probability column per class")
    parser.add_argument("--sample-submission", metavar="FILE", help="with --kaggle or --kaggle-probabilities: the "
                                                                    "competition's sample submission, whose header "
                                                                    "names (and orders) the columns")
    parser.add_argument("--tta", action="store_true", help="average with the horizontally flipped image")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    return parse_script_args(parser, argv)


def kaggle_form(args: argparse.Namespace):
    """The submission --kaggle / --kaggle-probabilities ask for, or None; flags that need one of them
    are refused without it."""
    if args.kaggle_label and args.kaggle_probabilities:
        raise UsageError("--kaggle-label goes with --kaggle (one label per image), not with --kaggle-probabilities")
    if not (args.kaggle or args.kaggle_probabilities):
        for flag, value in (("--kaggle-label", args.kaggle_label), ("--sample-submission", args.sample_submission)):
            if value:
                raise UsageError(f"{flag} shapes a Kaggle submission: add --kaggle (or --kaggle-probabilities)")
        return None
    from trainer.inference.predict import KaggleForm

    return KaggleForm(args.kaggle_label or "name", args.kaggle_probabilities, args.sample_submission)


def main() -> int:
    args = parse_args()
    out, note = output_file(args.out, "--out", (".csv",))
    kaggle = kaggle_form(args)
    from trainer.inference.predict import InferenceOptions, Listing, predict_to_csv

    options = InferenceOptions(args.batch_size, args.num_workers, args.device, args.tta)
    listing = Listing(args.csv, args.hf, args.hf_split, args.shards, args.shards_split, args.data_root)
    predict_to_csv(args.checkpoint, args.inputs, out, options, top_k=args.top_k, kaggle=kaggle, listing=listing)
    if note:
        print(note)
    return 0


if __name__ == "__main__":
    run_main(main)
