"""What docs/extending.md promises an objective's author beyond the hooks: logged scalars may be numbers or
one-element tensors (anything else is an error naming the key, not a silently missing column), a BatchNorm the
objective builds becomes global with the model's, and keeping the trained model as an attribute is refused."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from simclr_cli.losses.contrastive import nt_xent
from simclr_cli.models.global_bn import GlobalBatchNorm
from simclr_cli.objectives import Objective, build_objective, register, unregister
from simclr_cli.recipe import load_recipe
from simclr_cli.stages import pretrain


class _Scalars(Objective):
    """Logs a Python float, a one-element tensor and (when ``bad``) a vector."""

    name = "scalars_test"
    bad = False

    def forward(self, model, x1, x2, batch):
        _, z = model(torch.cat([x1, x2]))
        z1, z2 = z.chunk(2)
        out = {"loss": nt_xent(z1, z2, 0.5), "a_float": 1.5, "one_element": torch.tensor([2.0])}
        if self.bad:
            out["per_dim"] = z.std(0)
        return out


class _PredictorWithBN(Objective):
    name = "bn_test"

    def build(self, model):
        d = self.projection_dim(model)
        self.predictor = nn.Sequential(nn.Linear(d, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, d))


class _KeepsModel(Objective):
    name = "keeps_model_test"

    def build(self, model):
        self.online = model  # what the docs warn against: a submodule, so the model's weights twice in the state


@pytest.fixture
def registered():
    names = []

    def add(cls):
        register(cls)
        names.append(cls.name)
        return cls

    yield add
    for name in names:
        unregister(name)


def test_numbers_and_one_element_tensors_are_logged(registered, tiny_recipe_file, tmp_path):
    registered(_Scalars)
    recipe = load_recipe(tiny_recipe_file, ["pretrain.objective=scalars_test", "pretrain.knn_every=0",
                                            "pretrain.log_every=1", "pretrain.max_steps=2"])
    pretrain.run(recipe, tmp_path / "run", show_progress=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    logged = [x for x in lines if "loss" in x]
    assert len(logged) == 2 and all(x["a_float"] == 1.5 and x["one_element"] == 2.0 for x in logged)


def test_a_value_that_is_not_a_scalar_is_an_error_naming_it(registered, tiny_recipe_file, tmp_path, monkeypatch):
    registered(_Scalars)
    monkeypatch.setattr(_Scalars, "bad", True)
    recipe = load_recipe(tiny_recipe_file, ["pretrain.objective=scalars_test", "pretrain.knn_every=0",
                                            "pretrain.max_steps=2"])
    with pytest.raises(TypeError, match=r"objective 'scalars_test': forward\(\) returned 'per_dim' = \(\d+,\): the loss "
                                        r"and each logged value must be a 0-dim or one-element tensor or a number"):
        pretrain.run(recipe, tmp_path / "run", show_progress=False)


def test_batchnorm_the_objective_builds_is_global_with_the_models(registered, tiny_recipe_file):
    """With pretrain.sync_bn and several CPU processes the model's BN is global; so is the predictor's (it was
    left per-process: 2 processes then trained differently from 1)."""
    registered(_PredictorWithBN)
    recipe = load_recipe(tiny_recipe_file, ["pretrain.objective=bn_test", "pretrain.sync_bn=true"])
    objective = build_objective(recipe.pretrain)
    two_cpu_processes = SimpleNamespace(num_processes=2, device=torch.device("cpu"))
    views = SimpleNamespace(batched=False, device_decode=False)
    task, bn_mode = pretrain._build_task(recipe, objective, views, two_cpu_processes, 0)
    assert bn_mode == "global"
    assert type(task.objective.predictor[1]) is GlobalBatchNorm
    assert not [m for m in task.modules() if type(m) in (nn.BatchNorm1d, nn.BatchNorm2d)]


def test_keeping_the_trained_model_as_an_attribute_is_refused(registered, tiny_recipe_file, tmp_path):
    registered(_KeepsModel)
    recipe = load_recipe(tiny_recipe_file, ["pretrain.objective=keeps_model_test", "pretrain.knn_every=0"])
    with pytest.raises(TypeError, match=r"objective 'keeps_model_test': build\(\) kept the trained model's parameters "
                                        r"as its own \(online\..*store it in a list, self._online = \[model\]"):
        pretrain.run(recipe, tmp_path / "run", show_progress=False)
