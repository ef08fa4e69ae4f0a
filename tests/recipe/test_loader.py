import tomllib

import pytest

from simclr_cli.errors import RecipeError
from simclr_cli.recipe import (
    FromOption,
    Recipe,
    bundled_recipe_names,
    load_recipe,
    recipe_from_dict,
    recipe_to_toml,
    resolve_recipe_path,
)

BUNDLED = ["cifar10", "cifar100", "imagenet", "quickstart", "stl10"]


def test_bundled_recipes_are_shipped():
    assert set(BUNDLED) <= set(bundled_recipe_names())


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_recipe_validates_and_name_matches_stem(name):
    recipe = load_recipe(name)
    assert recipe.name == name == resolve_recipe_path(name).stem
    # round trip through the writer gives the same recipe
    assert recipe_from_dict(tomllib.loads(recipe_to_toml(recipe))) == recipe


def test_imagenet_recipe_is_the_paper_default():
    r = load_recipe("imagenet")
    assert (r.model.backbone, r.pretrain.batch_size, r.pretrain.optimizer) == ("resnet50", 4096, "lars")
    assert (r.pretrain.lr, r.pretrain.lr_scaling, r.pretrain.weight_decay) == (0.3, "linear", 1e-6)
    assert (r.pretrain.options.temperature, r.pretrain.epochs, r.pretrain.warmup_epochs) == (0.1, 100, 10)
    assert r.augment.blur and r.augment.strength == 1.0 and r.data.image_size == 224
    assert (r.data.dataset, r.data.train_split, r.data.val_split) == ("imagefolder", "train", "val")


def test_cifar10_recipe_is_the_reference_cifar_recipe():
    r = load_recipe("cifar10")
    assert (r.model.backbone, r.model.cifar_stem, r.pretrain.batch_size) == ("resnet18", True, 512)
    assert (r.pretrain.optimizer, r.pretrain.lr, r.pretrain.options.temperature) == ("lars", 1.0, 0.5)
    assert (r.augment.strength, r.augment.blur, r.pretrain.epochs) == (0.5, False, 1000)


def test_stl10_recipe_pretrains_on_unlabeled_plus_train():
    r = load_recipe("stl10")
    assert r.data.train_split == "train+unlabeled" and r.data.image_size == 96 and r.augment.blur


def test_required_keys_exist():
    r = Recipe()
    for section, keys in {
        "data": "dataset root train_split val_split image_size num_workers",
        "model": "backbone cifar_stem proj_layers proj_hidden_dim proj_dim",
        "pretrain": "epochs max_steps batch_size optimizer lr lr_scaling weight_decay warmup_epochs objective "
        "sync_bn mixed_precision knn_every",
    }.items():
        for key in keys.split():
            assert hasattr(getattr(r, section), key), f"{section}.{key}"
    assert r.pretrain.max_steps == 0


def test_overrides_parse_toml_literals_and_fall_back_to_strings():
    r = load_recipe(
        "quickstart",
        ["pretrain.epochs=2", "data.root=/data/imagenet", "augment.crop_scale=[0.2,1.0]", "pretrain.sync_bn=false",
         "seed=7", "pretrain.lr=2", "model.backbone=resnet18"],
    )
    assert r.pretrain.epochs == 2
    assert r.data.root == "/data/imagenet"
    assert r.augment.crop_scale == (0.2, 1.0)
    assert r.pretrain.sync_bn is False and r.seed == 7
    assert r.pretrain.lr == 2.0 and isinstance(r.pretrain.lr, float)
    assert r.model.backbone == "resnet18"


@pytest.mark.parametrize(
    "override, message",
    [
        ("pretrain.epoch=3", "unknown key 'pretrain.epoch' (did you mean 'pretrain.epochs'?)"),
        ("pretrian.epochs=3", "unknown key 'pretrian' (did you mean 'pretrain'?)"),
        ("pretrain.epochs=three", "'pretrain.epochs' must be an integer, got string 'three'"),
        ("pretrain.optimizer=lasr", "must be one of 'lars' | 'sgd' | 'adamw', got 'lasr' (did you mean 'lars'?)"),
        ("pretrain.epochs", "expected section.key=value"),
        ("pretrain=3", "'pretrain' is a section"),
        ("pretrain.batch_size=0", "'pretrain.batch_size' must be an integer >= 2, got 0"),
        ("pretrain.simclr.temperature=0", "'pretrain.simclr.temperature' must be a number > 0"),
        ("pretrain.temperature=0.2", "'pretrain.temperature' moved to 'pretrain.simclr.temperature'"),
        ("pretrain.simclr.temprature=1", "did you mean 'pretrain.simclr.temperature'"),
        ("pretrain.supcon.temperature=0.2", "[pretrain.supcon] holds options of the objective 'supcon', but pretrain.objective is 'simclr'"),
        ("pretrain.simclr.memory_size=-1", "'pretrain.simclr.memory_size' must be an integer >= 0"),
        ("augment.crop_scale=[0.9,0.1]", "'augment.crop_scale' must be [lo, hi] with 0 < lo <= hi <= 1"),
        ("augment.blur_p=1.5", "'augment.blur_p' must be a probability in [0, 1]"),
    ],
)
def test_bad_overrides_are_named(override, message):
    with pytest.raises(RecipeError, match=None) as e:
        load_recipe("quickstart", [override])
    assert message in str(e.value)
    assert "--set" in str(e.value)


def test_typed_overrides_keep_their_python_type_and_apply_after_set():
    odd = 'a "quoted" \\back\\slash, [not toml'
    r = load_recipe("quickstart", ["knn.k=3", "knn.temperature=0.5"],
                    {"knn.k": 20, "finetune.labels": "10%", "data.root": odd, "knn.temperature": 0.07,
                     "pretrain.lr": 2, "augment.crop_scale": (0.2, 1.0), "distill.hard": True})
    assert r.knn.k == 20 and r.knn.temperature == 0.07 and isinstance(r.knn.temperature, float)
    assert r.finetune.labels == "10%" and r.data.root == odd  # never read as TOML text
    assert r.pretrain.lr == 2.0 and isinstance(r.pretrain.lr, float) and r.augment.crop_scale == (0.2, 1.0)
    assert r.distill.hard is True
    # what the stages write and read back
    assert recipe_from_dict(tomllib.loads(recipe_to_toml(r))) == r


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("knn.k", 0, "--opt: 'knn.k' must be an integer >= 1, got 0"),
        ("knn.k", "5", "--opt: 'knn.k' must be an integer, got string '5'"),
        ("knn.k", 2.0, "--opt: 'knn.k' must be an integer, got number 2.0"),
        ("distill.hard", 1, "--opt: 'distill.hard' must be a boolean (true/false), got integer 1"),
        ("finetune.labels", 10, "--opt: 'finetune.labels' must be a string, got integer 10"),
        ("linear_eval.mode", "papr", "--opt: 'linear_eval.mode' must be one of 'cached' | 'paper', got 'papr' "
                                     "(did you mean 'paper'?)"),
        ("knn.kk", 5, "--opt: unknown key 'knn.kk' (did you mean 'knn.k'?)"),
        ("knn", 5, "--opt: 'knn' is a section"),
    ],
)
def test_bad_typed_overrides_name_the_option(key, value, message):
    with pytest.raises(RecipeError) as e:
        load_recipe("quickstart", values={key: FromOption("--opt", value)})
    assert message in str(e.value)
    with pytest.raises(RecipeError) as e:  # without an option: the key and the value
        load_recipe("quickstart", values={key: value})
    assert message.replace("--opt", f"{key}={value!r}") in str(e.value)


def _write(tmp_path, text):
    p = tmp_path / "r.toml"
    p.write_text(text)
    return p


def test_unknown_key_in_file_names_file_and_suggests(tmp_path):
    p = _write(tmp_path, 'name = "x"\n[model]\nbackbon = "resnet18"\n')
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    assert str(p) in str(e.value) and "unknown key 'model.backbon' (did you mean 'model.backbone'?)" in str(e.value)


def test_unknown_section(tmp_path):
    p = _write(tmp_path, "[augmnet]\nstrength = 0.5\n")
    with pytest.raises(RecipeError, match=r"unknown key 'augmnet' \(did you mean 'augment'\?\)"):
        load_recipe(p)


def test_wrong_type_names_expected_type(tmp_path):
    p = _write(tmp_path, "[pretrain]\nbatch_size = 2.5\n")
    with pytest.raises(RecipeError, match=r"r.toml: 'pretrain.batch_size' must be an integer, got number 2.5"):
        load_recipe(p)
    p = _write(tmp_path, '[augment]\nblur = "yes"\n')
    with pytest.raises(RecipeError, match="'augment.blur' must be a boolean"):
        load_recipe(p)
    p = _write(tmp_path, "[augment]\ncrop_scale = 0.2\n")
    with pytest.raises(RecipeError, match="'augment.crop_scale' must be an array of 2 numbers"):
        load_recipe(p)


def test_syntax_error_gives_line_and_column(tmp_path):
    p = _write(tmp_path, 'name = "x"\n[pretrain]\nepochs = = 3\n')
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    assert str(p) in str(e.value) and "line 3" in str(e.value) and "column" in str(e.value)


def test_every_stage_section_exists_and_checks_its_keys(tmp_path):
    p = _write(tmp_path, "[distill]\nepoch = 3\n")
    with pytest.raises(RecipeError, match="did you mean 'distill.epochs'"):
        load_recipe(p)
    load_recipe(_write(tmp_path, "[finetune]\n[distill]\n[transfer]\n[linear_eval]\n[knn]\n"))


def test_stage_sections_validate_their_values(tmp_path):
    r = load_recipe(_write(tmp_path, '[finetune]\nlabels = "1%"\nepochs = 3\n[linear_eval]\nmode = "paper"\n'))
    assert (r.finetune.labels, r.finetune.epochs, r.linear_eval.mode) == ("1%", 3, "paper")
    with pytest.raises(RecipeError, match="linear_eval.mode"):
        load_recipe(_write(tmp_path, '[linear_eval]\nmode = "fast"\n'))
    with pytest.raises(RecipeError, match="finetune.from_head_layer"):
        load_recipe(_write(tmp_path, "[finetune]\nfrom_head_layer = 5\n"))


def test_missing_recipe_suggests_bundled():
    with pytest.raises(RecipeError, match=r"did you mean 'cifar10'\?"):
        load_recipe("cifar1O")


def test_docs_recipe_reference_is_generated_from_the_schema():
    from pathlib import Path

    from simclr_cli.recipe.reference import recipe_reference

    doc = Path(__file__).resolve().parents[2] / "docs" / "recipes.md"
    assert doc.read_text() == recipe_reference(), "regenerate: python -m simclr_cli.recipe.reference > docs/recipes.md"


@pytest.mark.parametrize("name", ["", " ", ".", "..", "../x", "/abs/run", "a/b", "a\\b"])
def test_name_must_be_one_folder_name_inside_runs(name):
    # issue 11 item 11: name= wrote runs/pretrain, ../x and absolute names escaped runs/
    with pytest.raises(RecipeError) as e:
        load_recipe("quickstart", [f"name={name}"])
    assert "'name' must be a folder name" in str(e.value) and "--set name=" in str(e.value)
    assert load_recipe("quickstart", ["name=my-run_2.b"]).name == "my-run_2.b"


def test_seed_must_fit_in_64_bits(tmp_path):
    # issue 11 item 12: a seed past int64 validated, then crashed torch.manual_seed at run time
    with pytest.raises(RecipeError, match=r"r.toml: 'seed' must be an integer from -2\*\*63 to 2\*\*63 - 1"):
        load_recipe(_write(tmp_path, "seed = 9223372036854775808\n"))
    with pytest.raises(RecipeError, match="'seed' must be"):
        load_recipe("quickstart", ["seed=-9223372036854775809"])
    assert load_recipe("quickstart", ["seed=9223372036854775807"]).seed == 2**63 - 1


def test_utf8_bom_is_accepted_and_other_encodings_are_named(tmp_path):
    # issue 11 item 12: a BOM was an "invalid statement", non-UTF-8 a raw UnicodeDecodeError (exit 1)
    p = tmp_path / "bom.toml"
    p.write_bytes(b'\xef\xbb\xbfname = "bom"\n[pretrain]\nepochs = 3\n')
    r = load_recipe(p)
    assert (r.name, r.pretrain.epochs) == ("bom", 3)
    p = tmp_path / "latin1.toml"
    p.write_bytes('name = "x"\n# caf\u00e9\n'.encode("latin-1"))
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    assert str(p) in str(e.value) and "not UTF-8" in str(e.value) and "line 2" in str(e.value)


def test_bundled_recipes_use_one_knn_protocol_for_the_monitor_and_the_stage():
    """Issue 11 item 7: imagenet's `simclr knn` used tau 0.1 while its monitor used 0.07."""
    from simclr_cli.recipe import bundled_recipe_names, load_recipe

    for name in bundled_recipe_names():
        r = load_recipe(name)
        assert r.knn.temperature == r.pretrain.knn_temperature, name
        assert r.knn.k == r.pretrain.knn_k, name


def test_recipes_saved_by_earlier_versions_are_read_with_the_moved_keys_in_their_new_place():
    """Checkpoints and run folders keep the recipe they were trained with: the flat pretrain.temperature/loss/margin
    of earlier versions go to the selected objective's section (supcon keeps only its temperature)."""
    from simclr_cli.recipe import parse_saved_toml, parse_toml, recipe_from_dict

    old = '[pretrain]\ntemperature = 0.3\nloss = "nt_logistic"\nmargin = 0.2\n'
    r = recipe_from_dict(parse_saved_toml(old, "ckpt"), "ckpt")
    assert (r.pretrain.options.temperature, r.pretrain.options.loss, r.pretrain.options.margin) == (0.3, "nt_logistic", 0.2)
    r = recipe_from_dict(parse_saved_toml('[pretrain]\nobjective = "supcon"\n' + old.split("\n", 1)[1], "ckpt"), "ckpt")
    assert r.pretrain.options.temperature == 0.3
    with pytest.raises(RecipeError, match="'pretrain.temperature' moved to 'pretrain.simclr.temperature'"):
        recipe_from_dict(parse_toml(old, "mine.toml"), "mine.toml")  # a user's recipe: an error naming the new place


# --- an objective's options: where a newcomer puts them wrong, and switching the objective on the command line


def test_objective_chosen_on_the_command_line_replaces_the_files_section_of_the_old_one():
    """`--set pretrain.objective=supcon` on a recipe with [pretrain.simclr]: the file's options of the replaced
    objective do not apply (and cannot be removed with --set); a section given on the command line still can't
    be for an objective that is not selected."""
    r = load_recipe("cifar10", ["pretrain.objective=supcon"])
    assert r.pretrain.objective == "supcon" and type(r.pretrain.options).__name__ == "SupConOptions"
    with pytest.raises(RecipeError, match=r"\[pretrain.simclr\] holds options of the objective 'simclr'"):
        load_recipe("cifar10", ["pretrain.objective=supcon", "pretrain.simclr.temperature=0.3"])


def test_the_file_still_cannot_hold_a_section_of_an_objective_it_does_not_select(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('[pretrain]\nobjective = "supcon"\n[pretrain.simclr]\ntemperature = 0.1\n')
    with pytest.raises(RecipeError, match=r"remove the section or set pretrain.objective='simclr'"):
        load_recipe(p)


def test_a_pretrain_key_written_after_an_objective_header_is_explained(tmp_path):
    """TOML puts every line after [pretrain.supcon] into that table: say so, not 'pretrain.objective is simclr'."""
    p = tmp_path / "r.toml"
    p.write_text('[pretrain]\nepochs = 1\n[pretrain.supcon]\ntemperature = 0.1\nobjective = "supcon"\n')
    with pytest.raises(RecipeError, match=r"\[pretrain.supcon\] holds objective = \.\.\., a key of \[pretrain\]: in "
                                          r"TOML every key after the \[pretrain.supcon\] header belongs to that section"):
        load_recipe(p)


def test_an_objectives_option_named_like_a_pretrain_key_stays_its_own():
    from dataclasses import dataclass

    from simclr_cli.objectives import Objective, register, unregister
    from simclr_cli.recipe.schema import option

    @dataclass(frozen=True)
    class MomentumOptions:
        momentum: float = option(0.99, "the target network's momentum")

    class WithMomentum(Objective):
        name = "with_momentum_test"
        Options = MomentumOptions

    register(WithMomentum)
    try:
        r = load_recipe("quickstart", ["pretrain.objective=with_momentum_test", "pretrain.with_momentum_test.momentum=0.97"])
        assert r.pretrain.options.momentum == 0.97 and r.pretrain.momentum != 0.97
    finally:
        unregister("with_momentum_test")


@pytest.mark.parametrize("where", ["set", "file"])
def test_an_objectives_option_at_the_pretrain_level_names_its_section(tmp_path, where):
    want = r"'memory_size' is an option of the objective simclr; did you mean 'pretrain.simclr.memory_size'\?"
    with pytest.raises(RecipeError, match=want):
        if where == "set":
            load_recipe("quickstart", ["pretrain.memory_size=64"])
        else:
            p = tmp_path / "r.toml"
            p.write_text("[pretrain]\nmemory_size = 64\n")
            load_recipe(p)


def test_an_objectives_section_set_as_a_key_says_it_is_a_section():
    with pytest.raises(RecipeError, match=r"'pretrain.simclr' is the objective simclr's section, not a key; set one "
                                          r"of its options, e.g. --set pretrain.simclr\.\w+="):
        load_recipe("quickstart", ["pretrain.simclr=3"])
