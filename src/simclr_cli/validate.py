"""``simclr recipes validate``: everything about a recipe that can be checked without data or a run.

Beyond the schema (:func:`simclr_cli.recipe.load_recipe`: keys, types, ranges), the names that point into
registries: the timm backbone, the dataset and the pretraining objective. Each error blames where the value
came from: the last ``--set`` of that key, else the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from simclr_cli.data.sources.registry import pretraining_dataset
from simclr_cli.engine.tasks import grad_cache_chunk
from simclr_cli.engine.trackers import require_trackers, tracker_names
from simclr_cli.errors import RecipeError, SimclrError
from simclr_cli.models.backbone import check_backbone, create_backbone, fixed_input_size
from simclr_cli.objectives import build_objective
from simclr_cli.recipe import Recipe, load_recipe, resolve_recipe_path
from simclr_cli.recipe.loader import parse_override


def validate_recipe(file: str | Path, overrides: Sequence[str] = ()) -> tuple[Path, Recipe]:
    """Check a recipe file or bundled name, with ``--set`` overrides; return its path and the recipe.

    Raises:
        RecipeError: (exit 2) the first problem, naming the file or the ``--set`` it came from.
    """
    r = load_recipe(file, overrides)

    def origin(key: str) -> str:
        """Blame where a value came from: the last --set of it, else the file."""
        return next((f"--set {t}" for t in reversed(overrides) if parse_override(t)[0] == key),
                    str(resolve_recipe_path(file)))

    check_backbone(r.model.backbone, where=f"{origin('model.backbone')}: model.backbone")
    if fixed_input_size(r.model.backbone):  # built for one size (ViT): does it take data.image_size?
        create_backbone(r.model.backbone, image_size=r.data.image_size,
                        where=f"{origin('data.image_size')}: model.backbone")
    pretraining_dataset(r.data.dataset, where=f"{origin('data.dataset')}: data.dataset")
    objective = build_objective(r.pretrain)
    try:  # the gradient cache on one process (more processes split the batch further: checked again at the start)
        grad_cache_chunk(objective, r.pretrain.micro_batch_size, r.pretrain.batch_size, 1)
    except RecipeError as e:
        raise RecipeError(f"{origin('pretrain.micro_batch_size')}: {e}") from None
    try:
        require_trackers(tracker_names(r))  # an unknown name, or a tracker whose extra is not installed
    except SimclrError as e:
        raise RecipeError(f"{origin('trackers')}: {e}") from None
    return resolve_recipe_path(file), r
