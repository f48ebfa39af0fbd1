"""The classification report predict/evaluate write, checked by hand."""

import torch

from trainer.metrics import classification_report


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
