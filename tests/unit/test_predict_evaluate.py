"""The classification report predict/evaluate write, checked by hand."""

import pytest
import torch

from trainer.task.metrics import classification_report


def test_report_matches_a_hand_computation():
    y_true = torch.tensor([0, 0, 0, 1, 1, 2])
    y_pred = torch.tensor([0, 0, 1, 1, 2, 2])
    r = classification_report(y_true, y_pred, ["a", "b", "c"])
    assert r["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert r["accuracy"] == 4 / 6
    a, b, c = (r["per_class"][k] for k in "abc")
    assert (a["precision"], a["recall"], a["support"]) == (1.0, 2 / 3, 3)
    assert (b["precision"], b["recall"]) == (0.5, 0.5)
    assert (c["precision"], c["recall"]) == (0.5, 1.0)
    assert abs(a["f1"] - 0.8) < 1e-12 and abs(c["f1"] - 2 / 3) < 1e-12
    assert abs(r["macro_f1"] - (0.8 + 0.5 + 2 / 3) / 3) < 1e-12


@pytest.mark.parametrize("augment, extra, flips", [("standard", [], True), ("crop", [], False),
                                                   ("crop", ["hflip"], True), ("square", [], False)])
def test_flip_tta_only_for_models_trained_on_mirrored_images(tmp_path, capsys, augment, extra, flips):
    from helpers import make_image_folder
    from models import HeadSpec, build_classifier
    from trainer.inference.predict import InferenceOptions, predict_files
    from trainer.files.model_file import ClassifierFacts, load_classifier, save_classifier
    from data.transforms import Preprocessing

    built = build_classifier("tiny_cnn", 3)
    path = tmp_path / "best.safetensors"
    config = {"data": {"augment": augment, "augment_ops": extra}}
    facts = ClassifierFacts("tiny_cnn", HeadSpec().to_dict(), ["a", "b", "c"],
                            Preprocessing(16, 1.0, tuple(built.mean), tuple(built.std)), config=config)
    save_classifier(path, built.model.state_dict(), facts, metrics={}, epoch=1)
    image = next(make_image_folder(tmp_path / "imgs", per_class=1).rglob("*.png"))
    preds = predict_files(load_classifier(path), [image], InferenceOptions(num_workers=0, tta_flip=True))
    assert preds.flip_tta == flips
    assert ("--tta skipped: this model was trained without horizontal flips" in capsys.readouterr().err) != flips
