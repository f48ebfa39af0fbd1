"""The small CNN from the dog-breeds seed: three conv blocks, global pooling, an MLP classifier.

Trained from scratch it is the seed's baseline; on tiny images it is also the demo's model.
"""

from __future__ import annotations

from torch import nn

from models.registry import MODELS


class SimpleCNN(nn.Module):
    # The seed's layout: conv(3->32) | conv(32->64)+BN+pool | conv(64->128)+BN+pool | GAP | fc.
    # Normalization matches the seed's transforms (mean = std = 0.5).
    default_mean = (0.5, 0.5, 0.5)
    default_std = (0.5, 0.5, 0.5)

    def __init__(self, num_classes: int = 1000, width: int = 32, hidden: int = 512, dropout: float = 0.5,
                 batchnorm: bool = True):
        super().__init__()
        w = width
        norm = nn.BatchNorm2d if batchnorm else (lambda channels: nn.Identity())
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, 1, 1), nn.ReLU(inplace=True),
            nn.Conv2d(w, 2 * w, 3, 1, 1), nn.ReLU(inplace=True), norm(2 * w), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, 1, 1), nn.ReLU(inplace=True), norm(4 * w), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.fc1 = nn.Linear(4 * w, hidden)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.fc(self.drop(self.fc1(self.features(x)).relu()))


@MODELS.register("simple_cnn")
def simple_cnn(num_classes: int = 1000) -> SimpleCNN:
    return SimpleCNN(num_classes=num_classes)


@MODELS.register("tiny_cnn")
def tiny_cnn(num_classes: int = 1000) -> SimpleCNN:
    """A narrow SimpleCNN for tests and quick smoke runs."""
    return SimpleCNN(num_classes=num_classes, width=8, hidden=32, dropout=0.0)


@MODELS.register("tiny_cnn_nobn")
def tiny_cnn_nobn(num_classes: int = 1000) -> SimpleCNN:
    """tiny_cnn without BatchNorm: its result does not depend on how a batch is split across processes,
    which the 1-process vs N-process equivalence tests rely on."""
    return SimpleCNN(num_classes=num_classes, width=8, hidden=32, dropout=0.0, batchnorm=False)
