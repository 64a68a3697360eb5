"""Typed config values: `--set`, a `--config` JSON file and a sweep file parse every field alike."""

from __future__ import annotations

import json

import pytest
from ray import tune

from raylora.cli import main
from raylora.config import ConfigError, demo_config
from raylora.sweep import Sweep

FALSE = ["False", "false", "0", "no", "off", "NO"]
TRUE = ["True", "true", "1", "yes", "on"]


def _dump(capsys, *args: str) -> dict:
    assert main(["train", *args, "--dump"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("text", FALSE + TRUE)
def test_set_parses_booleans_never_as_truthy_strings(capsys, text):
    dumped = _dump(capsys, "--set", f"adapter.qlora={text}", "--set", f"data.packing={text}")
    assert dumped["adapter"]["qlora"] is (text in TRUE)
    assert dumped["data"]["packing"] is (text in TRUE)


def test_set_parses_ints_floats_none_and_lists(capsys):
    dumped = _dump(
        capsys,
        "--set",
        "training.max_steps=30",
        "--set",
        "adapter.r=8.0",  # a whole number written as a float
        "--set",
        "training.learning_rate=1e-3",
        "--set",
        "training.eval_batches=None",
        "--set",
        "training.activation_checkpointing=0.5",
        "--set",
        "adapter.modules_to_save=lm_head,embed_tokens",
        "--set",
        "adapter.target_modules=q_proj,v_proj",
    )
    assert dumped["training"]["max_steps"] == 30 and type(dumped["training"]["max_steps"]) is int
    assert dumped["adapter"]["r"] == 8 and type(dumped["adapter"]["r"]) is int
    assert dumped["training"]["learning_rate"] == 1e-3
    assert dumped["training"]["eval_batches"] is None
    assert dumped["training"]["activation_checkpointing"] == 0.5
    assert dumped["adapter"]["modules_to_save"] == ["lm_head", "embed_tokens"]
    assert dumped["adapter"]["target_modules"] == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    ("setting", "field", "fix"),
    [
        ("adapter.qlora=Flase", "`adapter.qlora` must be true or false, got 'Flase'", "write true or false"),
        ("adapter.r=8.5", "`adapter.r` must be a whole number, got 8.5", "write an integer"),
        (
            "training.learning_rate=fast",
            "`training.learning_rate` must be a number, got 'fast'",
            "e.g. 0.0002",
        ),
        (
            "training.max_steps=null",
            "`training.max_steps` must be a whole number, got None",
            "write an integer",
        ),
    ],
)
def test_set_refuses_what_does_not_parse_naming_field_value_and_fix(capsys, setting, field, fix):
    assert main(["train", "--set", setting, "--dump"]) == 2
    error = capsys.readouterr().err
    assert field in error and fix in error, error


def test_a_config_file_parses_like_set(tmp_path, capsys):
    data = demo_config().to_dict()
    data["adapter"]["qlora"] = "False"
    data["data"]["packing"] = "no"
    data["training"]["max_steps"] = "30"
    data["training"]["eval_batches"] = "null"
    path = tmp_path / "run.json"
    path.write_text(json.dumps(data))
    dumped = _dump(capsys, "--config", str(path))
    assert dumped["adapter"]["qlora"] is False and dumped["data"]["packing"] is False
    assert dumped["training"]["max_steps"] == 30 and dumped["training"]["eval_batches"] is None

    data["adapter"]["use_dora"] = "maybe"
    path.write_text(json.dumps(data))
    assert main(["train", "--config", str(path), "--dump"]) == 2
    assert "`adapter.use_dora` must be true or false, got 'maybe'" in capsys.readouterr().err


def test_a_sweep_parses_sampled_values_and_refuses_bad_ones_before_any_trial():
    sweep = Sweep(
        name="typed",
        base=demo_config(),
        search_space={"adapter.qlora": tune.choice(["False", "true"]), "adapter.r": tune.choice(["8", 16])},
    )
    sweep.validate()
    config = sweep.trial_config({"adapter.qlora": "False", "adapter.r": "8"})
    assert config.adapter.qlora is False and config.adapter.r == 8

    bad = Sweep(name="typed", base=demo_config(), search_space={"adapter.qlora": tune.choice(["Flase"])})
    with pytest.raises(ConfigError, match=r"`adapter.qlora` must be true or false, got 'Flase'"):
        bad.validate()


def test_a_config_built_in_python_is_type_checked_without_conversion():
    config = demo_config()
    config.adapter.qlora = "False"  # truthy: refused, with the value to write instead
    config.training.max_steps = "10"
    with pytest.raises(ConfigError) as info:
        config.validate()
    assert "`adapter.qlora` must be true or false, got 'False' (str); use False" in str(info.value)
    assert "`training.max_steps` must be a whole number, got '10' (str); use 10" in str(info.value)
    assert "found 2 problems" in str(info.value)  # not reported twice by the field's own range check
