"""Multi-label samples (`data.task = "multilabel"`): any number of classes per image.

The labels come from the CSV source (`data.source = "csv"`, `data.sources.csv_rows`): the
label column lists each image's class names separated by ';' (`img_001.png,red;blue`). The
classes are the names the training rows use, in data.class_order's order. Samples keep their first listed label as
their int label, so the audit, the class-folder tools and the stratified split see one class per
image; `MultiLabelSplits.label_sets` holds every label, and `targets` turns samples into the
multi-hot vectors BCEWithLogitsLoss compares with.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from data.folders import Sample, Splits

SEPARATOR = ";"


@dataclass
class MultiLabelSplits(Splits):
    """Splits whose samples carry their first label; `label_sets` maps each path to all its labels."""

    label_sets: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def class_counts(self, split: str = "train") -> dict[str, int]:
        """Images of each class (an image counts once for every label it has)."""
        counts = dict.fromkeys(self.classes, 0)
        for path, _ in getattr(self, split):
            for label in self.label_sets[path]:
                counts[self.classes[label]] += 1
        return counts

    def label_names(self, split: str) -> list[str]:
        """Each sample's class names, ';'-separated: its first label, then the others (as a CSV row
        lists them, so reading them back gives the same first label and label set)."""
        names = self.classes
        return [SEPARATOR.join([names[label]] + [names[i] for i in self.label_sets[path] if i != label])
                for path, label in getattr(self, split)]

    def targets(self, samples: list[Sample]) -> list[tuple[str, torch.Tensor]]:
        """(path, multi-hot float vector) for each sample: what BCEWithLogitsLoss compares with."""
        return [(path, multi_hot(self.label_sets[path], len(self.classes))) for path, _ in samples]


def multi_hot(labels, num_classes: int) -> torch.Tensor:
    target = torch.zeros(num_classes)
    target[list(labels)] = 1.0
    return target
