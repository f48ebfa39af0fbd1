"""data.source = "folder": class folders under data.root (data.folders.discover: split folders,
or one folder of class folders split by data.val_fraction), and an optional labelled test/ folder."""

from __future__ import annotations

from pathlib import Path

from configs.errors import UsageError
from data.folders import TEST_NAMES, Splits, discover, list_images
from data.sources.base import ListedImages, Source, by_fraction, named_samples, register


@register("folder")
class FolderSource(Source):
    def _load(self) -> Splits:
        return discover(self.d.root, self.d.val_fraction, self.d.seed, self.recorded)

    def listed(self, split: str | None = None, labelled: bool = True) -> ListedImages:
        """train or val: the split's images (before the audit); test (the default, when there is
        one): the images in the test/ folder's class folders."""
        if split in ("train", "val") or (split is None and self._test_folder() is None):
            return named_samples(self.splits(), split or "val", f"the {split or 'val'} split of {self.root}")
        return self._test_split()

    def _test_folder(self) -> Path | None:
        return next((d for d in sorted(self.root.iterdir()) if d.is_dir() and d.name.lower() in TEST_NAMES), None)

    def _test_split(self) -> ListedImages:
        """The test/ folder's images, labelled by the class folder they are in."""
        folder = self._test_folder()
        if folder is None:
            raise UsageError(f"the run's data root {self.root} has no test/ folder; evaluate another labelled folder "
                             f"by naming it instead of --split")
        paths, labels = [], []
        for class_dir in sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")):
            found = list_images(class_dir)
            paths += found
            labels += [class_dir.name] * len(found)
        return ListedImages(paths, labels, f"the test split of {self.root}")

    @classmethod
    def description(cls, data: dict, layout: str) -> str:
        root = f"`data.root` = `{data.get('root', '?')}`"
        how = {"split-folders": "validation: its own val/ folder",
               "class-folders": f"validation: {by_fraction(data)}"}.get(
            layout, f"validation: its val/ folder, or else {by_fraction(data)}")
        return f"An image folder ({root}); {how}"
