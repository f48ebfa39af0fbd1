"""Every seed recipe has a config in configs/."""

from helpers import REPO

CONFIGS = sorted((REPO / "configs").glob("*.toml"))


def test_every_seed_recipe_has_a_config():
    names = {p.stem for p in CONFIGS}
    assert {"regnet", "dogs_simple_cnn", "dogs_resnet18_frozen", "ants_bees_finetune",
            "ants_bees_feature_extractor", "cats_dogs_alexnet", "puppies_kittens"} <= names
