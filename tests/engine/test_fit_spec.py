"""FitSpec.from_section: one mapping from a recipe's training section to the loop's numbers."""

from __future__ import annotations

from dataclasses import fields, replace

import pytest

from simclr_cli.engine.fit import FitSpec
from simclr_cli.recipe.schema import DataConfig, Recipe, ResumableTrainingSection, TrainingSection


def _changed(section):
    """The section with every key that FitSpec also has set away from its default."""
    spec_keys = {f.name for f in fields(FitSpec)}
    values = {}
    for f in fields(section):
        if f.name not in spec_keys:
            continue
        value = getattr(section, f.name)
        values[f.name] = (not value if isinstance(value, bool) else
                          "skip" if f.name == "on_nonfinite" else "adamw" if f.name == "optimizer" else
                          "sqrt" if f.name == "lr_scaling" else value + 3)
    return replace(section, **values), values


@pytest.mark.parametrize("name", ["pretrain", "finetune", "distill", "linear_eval"])
def test_from_section_carries_every_shared_key(name):
    section, values = _changed(getattr(Recipe(), name))
    assert {"epochs", "batch_size", "lr", "momentum", "weight_decay", "log_every"} <= set(values)
    data = DataConfig(num_workers=3, max_bad_fraction=0.25)
    spec = FitSpec.from_section(section, data=data, seed=11)
    for key, value in values.items():
        assert getattr(spec, key) == value, key
    assert (spec.seed, spec.num_workers, spec.max_bad_fraction) == (11, 3, 0.25)


def test_from_section_changes_win_and_missing_keys_keep_the_supervised_defaults():
    r = Recipe()
    spec = FitSpec.from_section(r.linear_eval, data=r.data, seed=0, epochs=5)
    assert spec.epochs == 5
    # linear-eval keeps no state: its spec has FitSpec's own saving defaults, not a section's
    assert (spec.save_every, spec.keep_states, spec.optimizer) == (FitSpec.save_every, FitSpec.keep_states, "sgd")


def test_training_sections_share_one_base():
    r = Recipe()
    assert isinstance(r.linear_eval, TrainingSection) and not isinstance(r.linear_eval, ResumableTrainingSection)
    assert isinstance(r.finetune, ResumableTrainingSection) and isinstance(r.distill, ResumableTrainingSection)
