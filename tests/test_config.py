"""Recipes: TOML then flags, type and range checks, TOML output, the schedules, the recipes shipped."""

import math
import sys
from pathlib import Path

import pytest
import torch

from resnets.config import TrainConfig, from_dict, load_config
from resnets.errors import ConfigError
from resnets.registry import get_entry
from resnets.train import lr_at, param_groups

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))


def test_flags_override_the_recipe_which_overrides_the_defaults(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        'model = "resnet56"\nepochs = 30\nlr = 0.05\nmilestones = [10, 20]\nschedule = "step"\n'
    )
    cfg = load_config(recipe, {"lr": 0.3, "batch_size": 32})
    assert (cfg.model, cfg.epochs, cfg.lr, cfg.batch_size) == ("resnet56", 30, 0.3, 32)
    assert cfg.milestones == (10, 20) and cfg.schedule == "step"
    assert cfg.momentum == TrainConfig().momentum  # untouched: the default


@pytest.mark.parametrize(
    "text, message",
    [
        ("epochz = 3", "unknown key 'epochz'.*did you mean epochs"),
        ('epochs = "ten"', "epochs must be an integer, got 'ten'"),
        ("epochs = 2.5", "epochs must be an integer"),
        ("lr = true", "lr must be a number"),
        ("nesterov = 1", "nesterov must be true or false"),
        ("milestones = [1.5]", "milestones must be a list of integers"),
        ("epochs = -1", "epochs must be at least 1, got -1"),
        ("batch_size = 0", "batch_size must be at least 1, got 0"),
        ('schedule = "linear"', "schedule must be one of"),
        ("[model_args]\ndropout = 0.3", "tables are not part of a recipe"),
        ("epochs = ", "not valid TOML"),
        ('schedule = "step"', "needs milestones"),
        ("batch_size = 10\naccum_steps = 3", "not divisible by accum_steps"),
    ],
)
def test_bad_recipes_name_the_key(tmp_path, text, message):
    recipe = tmp_path / "bad.toml"
    recipe.write_text(text + "\n")
    with pytest.raises(ConfigError, match=message):
        load_config(recipe)


def test_int_is_accepted_where_a_float_is_expected():
    assert from_dict({"lr": 1}).lr == 1.0 and isinstance(from_dict({"lr": 1}).lr, float)


def test_toml_output_reads_back_to_the_same_config():
    cfg = from_dict(
        {"model": 'we"ird\\name', "milestones": [3, 7], "schedule": "step", "lr": 0.1, "flip": True}
    )
    text = cfg.to_toml()
    assert "cache_dir" not in text  # unset optional fields are left out
    assert from_dict(tomllib.loads(text)) == cfg


def test_warmup_then_each_schedule():
    spe = 10
    base = dict(epochs=10, lr=1.0, warmup_epochs=2)
    warm = [lr_at(s, from_dict({**base, "schedule": "cosine"}), spe) for s in range(20)]
    assert warm == pytest.approx([(s + 1) / 20 for s in range(20)])
    cos = from_dict({**base, "schedule": "cosine"})
    assert lr_at(20, cos, spe) == pytest.approx(1.0)
    assert lr_at(60, cos, spe) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    one = from_dict({**base, "schedule": "onecycle"})
    assert lr_at(60, one, spe) == pytest.approx(0.5) and lr_at(99, one, spe) == pytest.approx(1 / 80)
    step = from_dict({**base, "schedule": "step", "milestones": [5, 8], "gamma": 0.2})
    assert [lr_at(s, step, spe) for s in (49, 50, 79, 80, 99)] == pytest.approx([1, 0.2, 0.2, 0.04, 0.04])
    const = from_dict({**base, "schedule": "constant"})
    assert lr_at(95, const, spe) == 1.0


def test_no_weight_decay_on_norm_and_bias():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2))
    decay, no_decay = param_groups(model, 5e-4, decay_norm_bias=False)
    assert [p.shape for p in decay["params"]] == [(4, 3, 3, 3), (2, 4)]
    assert len(no_decay["params"]) == 4 and no_decay["weight_decay"] == 0.0  # conv bias, BN w+b, fc bias
    all_decay, none = param_groups(model, 5e-4, decay_norm_bias=True)
    assert len(all_decay["params"]) == 6 and not none["params"]


def test_shipped_recipes_load_name_their_paper_table_and_set_every_optimisation_key():
    # The defaults are the digits recipe; a paper recipe must not inherit its choices silently.
    explicit = {"model", "data", "epochs", "batch_size", "lr", "momentum", "nesterov", "weight_decay"}
    explicit |= {"schedule", "warmup_epochs", "label_smoothing", "flip"}
    assert len(CONFIGS) >= 10
    for path in CONFIGS:
        cfg = load_config(path)
        get_entry(cfg.model)  # a registered model
        assert "Table" in path.read_text(), path
        assert explicit <= set(tomllib.loads(path.read_text())), (
            path,
            explicit - set(tomllib.loads(path.read_text())),
        )
