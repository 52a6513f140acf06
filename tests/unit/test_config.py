"""The training configuration: the dataclass's checks, a YAML file's values and paths, and flags on top."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from sami_mlx.cli.train_flags import add_arguments, build_config
from sami_mlx.config import TrainConfig, check_sampling
from sami_mlx.config_file import config_from_file, find_recipe, load_run_config, recipe_dir, recipe_names
from sami_mlx.errors import SamiError

BASE = {"model": "org/model", "constitution": "c.yaml"}


def resolved(**values) -> TrainConfig:
    return TrainConfig(**{**BASE, **values}).resolved()


# ---- the dataclass --------------------------------------------------------------------------


def test_resolved_fills_the_defaults_that_depend_on_other_fields():
    cfg = resolved(template="auto", variants=" 4", grad_accumulation=" 2 ", report_to="SwanLab, wandb, swanlab")
    assert cfg.template is None and cfg.generation_template is None  # chosen once the model is known
    assert cfg.variants == "4" and cfg.grad_accumulation == 2 and cfg.report_to == "swanlab,wandb"
    assert cfg.out.startswith("runs/")
    assert cfg.micro_batches == 2 and cfg.groups_per_micro_batch == 4  # 8 query groups per step
    assert [cfg.steps_in_iteration(i) for i in range(3)] == [8, 16, 24]
    assert resolved(template="dialogue").training_template == "dialogue"
    assert resolved(schedule="continue").steps_in_iteration(2) == 8
    assert TrainConfig(**BASE).to_dict()["lora_rank"] == 16


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"model": ""}, "--model is required"),
        ({"constitution": ""}, "--constitution is required"),
        ({"steps": 0}, "--steps 0: must be at least 1"),
        ({"queries_per_step": 2, "grad_accumulation": 3}, "--grad-accumulation: cannot exceed --queries-per-step"),
        ({"grad_accumulation": "many"}, "--grad-accumulation many: use 'auto'"),
        ({"learning_rate": 1.5}, "--learning-rate 1.5: must be between 0 and 1"),
        ({"kl_beta": -1.0}, "--kl-beta -1.0: must be between 0"),
        ({"temperature": 11.0}, "--temperature 11.0: must be between 0 and 10"),
        ({"schedule": "cosine"}, "--schedule 'cosine'"),
        ({"dequantize": "maybe"}, "--dequantize 'maybe'"),
        ({"anchor_beta": 0.0, "anchor_template": "a.txt"}, "--anchor-template: has no effect"),
        ({"max_ppl_ratio": 1.0}, "--max-ppl-ratio 1.0: must be above 1"),
        ({"monitor_every": -1}, "--monitor-every -1: must be 0 or more"),
        ({"echo_words": -2}, "--echo-words -2: must be 0 or more"),
        ({"sentence_end": "all", "sentence_end_marks": [" "]}, "--sentence-end-marks: empty"),
        ({"report_to": "tensorboard"}, "unknown tracker 'tensorboard'"),
        ({"variants": "1"}, "--variants"),
    ],
)
def test_a_setting_that_cannot_work_is_refused_naming_its_flag(values, message):
    with pytest.raises(SamiError) as e:
        resolved(**values)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_sampling_settings_name_the_flag_or_field_they_came_from():
    check_sampling(0.0, 1.0, 1)
    check_sampling()  # nothing given: nothing to check
    with pytest.raises(SamiError, match="--top-p 0.0: must be above 0"):
        check_sampling(top_p=0.0)
    with pytest.raises(SamiError, match="max_tokens 0: must be at least 1"):
        check_sampling(max_tokens=0, names=("temperature", "top_p", "max_tokens"))


# ---- the config file ------------------------------------------------------------------------


def write(folder: Path, text: str, name: str = "run.yaml") -> str:
    path = folder / name
    path.write_text(text)
    return str(path)


def test_yaml_values_are_coerced_to_the_fields_types(tmp_path):
    values = config_from_file(
        write(
            tmp_path,
            "lora-rank: 8.0\nmax_ppl_ratio: off\nmax-prompted-ratio: 'none'\ndequantize: no\nstop: END\n"
            "chat_template: auto\nshuffle_principles: false\nlearning_rate: 1e-4\nvariants: 4\n",
        )
    )
    assert values["lora_rank"] == 8 and isinstance(values["lora_rank"], int)
    assert values["max_ppl_ratio"] is None and values["max_prompted_ratio"] is None  # a guard turned off
    assert values["dequantize"] == "no"  # YAML 1.1 reads a bare no as false
    assert values["stop"] == ["END"] and values["chat_template"] is None and values["shuffle_principles"] is False
    assert values["learning_rate"] == 1e-4 and values["variants"] == "4"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lora_rnak: 8\n", "unknown setting 'lora_rnak'"),
        ("lora_rank: 8.5\n", "setting 'lora_rank' must be a whole number, got 8.5"),
        ("dora: 'yes please'\n", "setting 'dora' must be true or false"),
        ("learning_rate: fast\n", "setting 'learning_rate' must be a number"),
        ("stop: [1, 2]\n", "setting 'stop' must be a list of strings"),
        ("steps:\n", "setting 'steps' cannot be empty"),
        ("- model\n", "expected a mapping of settings, got list"),
    ],
)
def test_a_bad_value_in_a_config_file_names_the_file_and_the_setting(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(SamiError) as e:
        config_from_file(path)
    assert str(e.value).startswith(path) and message in str(e.value)


def test_relative_paths_are_found_next_to_the_config_file(tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    (folder / "model").mkdir(parents=True)
    (folder / "c.yaml").write_text("name: c\n")
    path = write(folder, "model: model\nconstitution: c.yaml\nqueries: dialogue\ntemplate: org/absent.txt\n")
    monkeypatch.chdir(tmp_path)  # not the config's folder
    values = config_from_file(path)
    assert values["model"] == str((folder / "model").absolute())
    assert values["constitution"] == str((folder / "c.yaml").absolute())
    assert values["queries"] == "dialogue"  # a built-in set's name stays a name
    assert values["template"] == "org/absent.txt"  # nothing there: left as written (a path from the cwd)
    assert config_from_file(write(folder, "")) == {}


def test_a_shipped_recipe_is_found_by_name_with_its_data_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name = recipe_names()[0]
    values = config_from_file(name)
    assert values == config_from_file(str(recipe_dir() / f"{name}.yaml"))
    assert Path(values["constitution"]).is_file() and Path(values["constitution"]).is_absolute()
    assert find_recipe(write(tmp_path, "model: m\n", f"{name}.yaml")) is None  # a file of that name wins
    with pytest.raises(SamiError, match="-c no-such-recipe: config file not found, and no shipped recipe"):
        config_from_file("no-such-recipe")


def test_a_run_directory_without_its_config_says_which_flag_to_fix(tmp_path):
    with pytest.raises(SamiError, match=f"--run {tmp_path}: no config.yaml there; pass a run directory"):
        load_run_config(tmp_path)
    write(tmp_path, "steps: 2\n", "config.yaml")
    with pytest.raises(SamiError, match="no 'model' setting; this file is damaged"):
        load_run_config(tmp_path, flag="")


# ---- flags on top -----------------------------------------------------------------------------


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_flags_override_the_config_file_which_overrides_the_defaults(tmp_path):
    path = write(tmp_path, "model: org/model\nconstitution: c.yaml\nsteps: 5\nlora_rank: 4\nstop: [A]\n")
    cfg = build_config(parse(["-c", path, "--steps", "7", "--max-ppl-ratio", "off", "--no-shuffle-principles"]))
    assert (cfg.steps, cfg.lora_rank, cfg.stop) == (7, 4, ["A"])  # flag, file, file
    assert cfg.max_ppl_ratio is None and cfg.shuffle_principles is False
    assert cfg.learning_rate == TrainConfig().learning_rate  # neither: the default
    cfg = build_config(parse(["--model", "m", "--constitution", "c", "--stop", "X", "Y", "--max-prompted-ratio", "4"]))
    assert cfg.stop == ["X", "Y"] and cfg.max_prompted_ratio == 4.0


def test_every_field_has_a_flag_with_its_help(capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = {a.dest: a for a in parser._actions}
    for name in TrainConfig.__dataclass_fields__:
        assert name in flags and flags[name].help, name
    with pytest.raises(SystemExit):
        parse(["--max-ppl-ratio", "high"])
    assert "--max-ppl-ratio: invalid float value: 'high'" in capsys.readouterr().err
