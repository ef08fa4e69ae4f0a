"""simclr_cli.validate without the CLI: the registry checks blame the --set or the file."""

import pytest

from simclr_cli.errors import SimclrError
from simclr_cli.recipe import resolve_recipe_path
from simclr_cli.validate import validate_recipe


def test_validate_recipe_returns_the_path_and_blames_the_origin(tiny_recipe_file):
    path, r = validate_recipe(tiny_recipe_file)
    assert path == resolve_recipe_path(tiny_recipe_file) and r.name == "tiny"
    with pytest.raises(SimclrError) as e:
        validate_recipe(tiny_recipe_file, ["data.dataset=cifar"])
    assert "--set data.dataset=cifar: data.dataset: 'cifar' is not a dataset" in str(e.value)
    with pytest.raises(SimclrError) as e:
        validate_recipe("quickstart", ["model.backbone=resnet5O"])
    assert str(e.value).startswith("--set model.backbone=resnet5O: model.backbone:")


def test_validate_checks_the_trackers_extras(tiny_recipe_file, without_module):
    """Review 15: `recipes validate` accepted trackers=wandb without the wandb extra; the stage then refused."""
    validate_recipe(tiny_recipe_file, ["trackers=wandb"])
    without_module("wandb")
    with pytest.raises(SimclrError) as e:
        validate_recipe(tiny_recipe_file, ["trackers=wandb"])
    assert str(e.value).startswith("--set trackers=wandb: trackers: 'wandb' needs the wandb extra")
    assert e.value.exit_code == 2
