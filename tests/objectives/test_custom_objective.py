"""A throwaway objective written in this file alone, as docs/extending.md says: its own options section
([pretrain.toy], checked by the recipe loader), a trainable predictor of its own, state (buffers) moved by
``after_step``, the plan from ``on_fit_start``; it trains and resumes bit-identically with no other file touched."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from simclr_cli.errors import Interrupted, RecipeError
from simclr_cli.losses.contrastive import nt_xent
from simclr_cli.objectives import FitInfo, Objective, register, unregister
from simclr_cli.recipe import load_recipe
from simclr_cli.recipe.schema import option
from simclr_cli.stages import pretrain


@dataclass(frozen=True)
class ToyOptions:
    """``[pretrain.toy]``: a test objective's options."""

    temperature: float = option(0.5, "temperature", check=("a number > 0", lambda v: v > 0))
    decay: float = option(0.5, "decay of the running mean of z", check=("a number in [0, 1]", lambda v: 0 <= v <= 1))


class Toy(Objective):
    """NT-Xent between a learned predictor of view 1 (minus a running mean of z) and view 2."""

    name = "toy"
    Options = ToyOptions
    fit_infos: list[FitInfo] = []

    def build(self, model: nn.Module) -> None:
        dim = self.projection_dim(model)
        self.predictor = nn.Linear(dim, dim)
        self.register_buffer("center", torch.zeros(dim))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self._mean = None

    def on_fit_start(self, info: FitInfo) -> None:
        Toy.fit_infos.append(info)

    def forward(self, model, x1, x2, batch):
        _, z = model(torch.cat([x1, x2]))
        z1, z2 = z.chunk(2)
        self._mean = z.detach().float().mean(0)
        loss = nt_xent(self.predictor(z1) - self.center, z2, self.options.temperature)
        return {"loss": loss, **self.metrics(z)}

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        self.center.mul_(self.options.decay).add_(self._mean, alpha=1 - self.options.decay)
        self.updates.add_(1)


@pytest.fixture
def toy_recipe(tiny_recipe_file):
    register(Toy)
    Toy.fit_infos.clear()
    text = tiny_recipe_file.read_text().replace("[pretrain.simclr]\ntemperature = 0.5",
                                                'objective = "toy"\n\n[pretrain.toy]\ntemperature = 0.4\ndecay = 0.8')
    # objective = "toy" lands at the end of [pretrain]'s keys: the sub-table starts after it
    tiny_recipe_file.write_text(text)
    yield tiny_recipe_file
    unregister("toy")


def _losses(run: Path) -> list:
    lines = [json.loads(x) for x in (run / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    return [(x["step"], x["loss"]) for x in lines if "loss" in x]


def _state(run: Path) -> dict[str, torch.Tensor]:
    return load_file(sorted((run / "pretrain" / "state").glob("step-*"))[-1] / "model.safetensors")


def test_an_objective_from_a_test_file_trains_and_resumes(toy_recipe, tmp_path):
    recipe = load_recipe(toy_recipe, ["pretrain.knn_every=0", "pretrain.log_every=1"])
    assert recipe.pretrain.options == ToyOptions(temperature=0.4, decay=0.8)
    with pytest.raises(RecipeError, match="did you mean 'pretrain.toy.decay'"):
        load_recipe(toy_recipe, ["pretrain.toy.decy=0.1"])
    with pytest.raises(RecipeError, match="'pretrain.toy.decay' must be a number in"):
        load_recipe(toy_recipe, ["pretrain.toy.decay=2"])

    pretrain.run(recipe, tmp_path / "ref", show_progress=False)
    with pytest.raises(Interrupted, match="at step 3"):
        pretrain.run(recipe, tmp_path / "run", show_progress=False, interrupt_after=3)
    pretrain.run(recipe, tmp_path / "run", show_progress=False, resume=True)
    assert [(i.total_steps, i.steps_per_epoch, i.world_size, i.start_step) for i in Toy.fit_infos] == \
        [(8, 4, 1, 0), (8, 4, 1, 0), (8, 4, 1, 3)]

    ref, run = _state(tmp_path / "ref"), _state(tmp_path / "run")
    assert int(ref["model.objective.updates"]) == 8  # after_step once per optimizer update
    assert ref["model.objective.center"].abs().sum() > 0
    # the predictor is trained (it went to the optimizer) and saved with the model: it moved between epochs
    states = sorted((tmp_path / "ref" / "pretrain" / "state").glob("step-*"))
    assert [p.name for p in states] == ["step-000000004", "step-000000008"]
    first = load_file(states[0] / "model.safetensors")
    assert not torch.equal(first["model.objective.predictor.weight"], ref["model.objective.predictor.weight"])
    assert _losses(tmp_path / "run") == _losses(tmp_path / "ref")
    assert run.keys() == ref.keys() and all(torch.equal(run[k], ref[k]) for k in ref)

