"""Config parsing: every error kind, path resolution, defaults, the namespace view and the TOML round trip."""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

import pytest

from wantrainer.config import FLAT_SECTIONS
from wantrainer.config.toml_writer import dump_toml, format_value
from wantrainer.config_parser import ConfigError, WanTrainerConfig, load_config, parse_config


def problems_of(data: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value.problems


def one_problem(data: dict) -> str:
    problems = problems_of(data)
    assert len(problems) == 1, problems
    return problems[0]


# ---- unknown keys -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"learning_rat": 1e-4}, "unknown key `learning_rat`; did you mean `learning_rate`?"),
        ({"datasets": {"general": {"batchsize": 2}}},
         "unknown key `datasets.general.batchsize`; did you mean `datasets.general.batch_size`?"),
        ({"datasets": {"train": [{"image_directory": "a", "resolutoin": 5}]}},
         "unknown key `datasets.train[0].resolutoin`; did you mean `datasets.train[0].resolution`?"),
        ({"datasets": {"trian": []}}, "unknown key `datasets.trian`; did you mean `datasets.train`?"),
        ({"datasets": {"latent_cache": {"devic": "cpu"}}},
         "unknown key `datasets.latent_cache.devic`; did you mean `datasets.latent_cache.device`?"),
        ({"sample_prompts": [{"text": "a cat", "cfg_scal": 3.0}]},
         "unknown key `sample_prompts[0].cfg_scal`; did you mean `sample_prompts[0].cfg_scale`?"),
    ],
)
def test_unknown_key_names_the_nearest_valid_key(data, expected):
    assert one_problem(data) == expected


def test_unknown_key_without_a_close_match_points_to_the_template():
    assert "see `wantrainer config template`" in one_problem({"zzzzqqq": 1})


def test_top_level_key_inside_a_table_is_explained():
    message = one_problem({"datasets": {"general": {"network_dim": 16}}})
    assert "`network_dim` is a top-level key" in message and "[datasets.general]" in message


def test_grouped_top_level_keys_are_explained():
    message = one_problem({"training": {"seed": 1, "learning_rate": 1e-4}})
    assert "unknown table [training]" in message and "`seed`, `learning_rate`" in message


def test_dataset_key_at_top_level_is_explained():
    assert "[datasets.general]" in one_problem({"batch_size": 2})


# ---- wrong types -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"max_train_steps": "abc"}, '`max_train_steps` must be an integer, got "abc" (a string)'),
        ({"network_dim": 1.5}, "`network_dim` must be an integer, got 1.5 (a number)"),
        ({"seed": True}, "`seed` must be an integer, got true (a boolean)"),
        ({"fp8_base": "yes"}, '`fp8_base` must be true or false, got "yes" (a string)'),
        ({"learning_rate": "1e-4"},
         '`learning_rate` must be a number, got "1e-4" (a string); write it without quotes: 1e-4'),
        ({"fp8_base": "true"}, '`fp8_base` must be true or false, got "true" (a string); write it without quotes: true'),
        ({"dit": 5}, "`dit` must be a path, got 5 (an integer)"),
        ({"optimizer_args": "lr=1"},
         '`optimizer_args` must be a list of strings, got "lr=1" (a string); write it as a list: ["lr=1"]'),
        ({"network_args": ["a=1", 2]}, "`network_args[1]` must be a string, got 2 (an integer)"),
        ({"lr_warmup_steps": "ten"}, '`lr_warmup_steps` must be a number, got "ten" (a string)'),
        ({"datasets": {"train": [{"image_directory": "a", "resolution": 5.5}]}},
         "`datasets.train[0].resolution` must be an integer, a string or a list of integers, got 5.5 (a number)"),
        ({"validation_timesteps": "100,abc"}, '`validation_timesteps[1]` must be an integer, got "abc" (a string)'),
    ],
)
def test_wrong_type_names_key_expected_type_and_value(data, expected):
    assert one_problem(data) == expected


def test_no_article_grammar_mistakes():
    problems = problems_of({"max_train_steps": "x", "seed": 1.5, "blocks_to_swap": -1, "output_name": 3})
    assert len(problems) == 4
    assert not any(" a integer" in p or " a array" in p for p in problems), problems


def test_single_table_instead_of_array_of_tables():
    message = one_problem({"sample_prompts": {"text": "a"}})
    assert message.startswith("`sample_prompts` must be a list of tables")
    assert "write [[sample_prompts]] with double brackets" in message
    assert "[[datasets.train]]" in one_problem({"datasets": {"train": {"image_directory": "a"}}})


# ---- bad values --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"max_train_steps": -5}, "`max_train_steps` must be >= 1, got -5"),
        ({"learning_rate": 0.0}, "`learning_rate` must be > 0, got 0.0"),
        ({"network_dropout": 2}, "`network_dropout` must be < 1, got 2"),
        ({"lr_scheduler": "cosinee"},
         '`lr_scheduler` must be one of "constant", "constant_with_warmup", "linear", "cosine", '
         '"cosine_with_restarts", "polynomial", "cosine_with_min_lr", got "cosinee"; did you mean "cosine"?'),
        ({"logging_level": "debug"},
         '`logging_level` must be one of "DEBUG", "INFO", "WARNING", "ERROR", got "debug"; did you mean "DEBUG"?'),
        ({"sample_prompts": [{"text": "a", "width": 100}]}, "`sample_prompts[0].width` must be a multiple of 16, got 100"),
        ({"sample_prompts": [{"text": "a", "frames": 4}]},
         "`sample_prompts[0].frames`: frames must be 4k+1 (1, 5, 9, ..., 81), got 4"),
        ({"sample_prompts": [{"negative_prompt": "x"}]}, "`sample_prompts[0].text` is required but missing"),
        ({"output_name": ""}, "`output_name` must not be empty"),
        ({"lr_warmup_steps": 1.5}, "`lr_warmup_steps` = 1.5: use an integer step count or a fraction below 1"),
    ],
)
def test_bad_value_says_what_is_allowed(data, expected):
    assert one_problem(data) == expected


def test_union_constraint_reported_once():
    assert one_problem({"lr_warmup_steps": -1}) == "`lr_warmup_steps` must be >= 0, got -1"


# ---- cross-field checks and all problems at once ------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "names"),
    [
        ({"datasets": {"train": [{"image_directory": "a", "video_directory": "b"}]}},
         ("`image_directory`", "`video_directory`", "mutually exclusive")),
        ({"min_timestep": 900, "max_timestep": 100}, ("`min_timestep`", "`max_timestep`")),
        ({"fp8_base": True, "dit_weight_dtype": "bf16"}, ("`dit_weight_dtype`", "`fp8_base`")),
    ],
)
def test_related_options_are_named_together(data, names):
    message = one_problem(data)
    assert all(name in message for name in names), message


def test_every_problem_of_a_file_is_reported_at_once():
    problems = problems_of({
        "learning_rat": 1e-4,
        "max_train_steps": -1,
        "fp8_base": "yes",
        "min_timestep": 900,
        "max_timestep": 100,
        "datasets": {"general": {"batchsize": 2}, "train": [{"image_directory": 5}]},
        "sample_prompts": [{"txt": "a"}],
    })
    joined = "\n".join(problems)
    for fragment in ("`learning_rat`", "`max_train_steps`", "`fp8_base`", "must be below `max_timestep`",
                     "`datasets.general.batchsize`", "`datasets.train[0].image_directory`",
                     "`sample_prompts[0].txt`", "`sample_prompts[0].text` is required"):
        assert fragment in joined, fragment
    assert len(problems) == 8, problems


def test_cross_field_check_skips_keys_already_reported():
    # fp8_base is wrong, so "dit_weight_dtype and fp8_base disagree" would only repeat the same mistake.
    problems = problems_of({"fp8_base": "yes", "dit_weight_dtype": "bf16"})
    assert problems == ['`fp8_base` must be true or false, got "yes" (a string)']


def test_config_error_message_lists_problems_with_correct_plural(tmp_path):
    one = ConfigError(["x"], source="a.toml")
    two = ConfigError(["x", "y"])
    assert str(one).splitlines()[0] == "1 problem in a.toml:"
    assert str(two).splitlines()[0] == "2 problems:"


# ---- files -----------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.toml")
    assert "config file not found" in info.value.problems[0] and "nope.toml" in info.value.problems[0]


def test_folder_instead_of_file(tmp_path):
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path)


def test_malformed_toml_reports_the_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('learning_rate = 1e-4\nseed = \noutput_name = "x"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = info.value.problems[0]
    assert message.startswith("malformed TOML at line 2, column 8")
    assert "2 | seed =" in message


def test_duplicate_key_reports_the_line(tmp_path):
    path = tmp_path / "dup.toml"
    path.write_text("seed = 1\nseed = 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="line 2"):
        load_config(path)


# ---- paths, defaults, views ---------------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    folder = tmp_path / "cfgs"
    folder.mkdir()
    (folder / "tok").mkdir()
    path = folder / "c.toml"
    path.write_text(
        'dit = "models/dit.safetensors"\nvae = "../vae.safetensors"\nt5_tokenizer = "tok"\n'
        'output_dir = "out"\n[[datasets.train]]\nimage_directory = "data/img"\n'
        '[[datasets.val]]\nimage_jsonl_file = "val.jsonl"\n',
        encoding="utf-8",
    )
    monkeypatch.chdir(tmp_path)  # the working folder must not matter
    cfg = load_config(path)
    assert cfg.model.dit == folder / "models" / "dit.safetensors"
    assert cfg.model.vae == tmp_path / "vae.safetensors"
    assert cfg.model.t5_tokenizer == str(folder / "tok")
    assert cfg.saving.output_dir == folder / "out"
    assert cfg.datasets.train[0].image_directory == folder / "data" / "img"
    assert cfg.datasets.val[0].image_jsonl_file == folder / "val.jsonl"
    assert cfg.config_dir == folder and cfg.config_path == path


def test_home_and_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = parse_config({"dit": "~/models/dit.safetensors", "vae": str(tmp_path / "v.safetensors"),
                        "t5_tokenizer": "google/umt5-xxl"}, config_dir=tmp_path / "elsewhere")
    assert cfg.model.dit == tmp_path / "home" / "models" / "dit.safetensors"
    assert cfg.model.vae == tmp_path / "v.safetensors"
    assert cfg.model.t5_tokenizer == "google/umt5-xxl"  # a hub id stays as written


def test_defaults():
    cfg = parse_config({})
    assert cfg.model.target_model == "wan21" and cfg.model.attn_mode == "sdpa"
    assert cfg.model.mixed_precision == "bf16" and cfg.model.dit is None
    assert cfg.training.max_train_steps == 1600 and cfg.training.seed == 42
    assert cfg.optimizer.optimizer_type == "adamw" and cfg.optimizer.learning_rate == 1e-4
    assert cfg.network.network_dim == 32 and cfg.network.network_alpha == 16.0
    assert cfg.timesteps.timestep_sampling == "shift" and cfg.loss.loss_type == "mse"
    assert cfg.validation.validation_timesteps == [100, 300, 500, 700, 900]
    assert cfg.sampling.sample_prompts == [] and cfg.datasets.train == []
    assert cfg.non_default_values() == {}


def test_warmup_accepts_steps_or_fraction():
    assert parse_config({"lr_warmup_steps": 100}).optimizer.lr_warmup_steps == 100
    assert parse_config({"lr_warmup_steps": 0.1}).optimizer.lr_warmup_steps == 0.1


def test_non_default_values_lists_only_changed_keys():
    cfg = parse_config({"learning_rate": 2e-4, "seed": 42, "network_dim": 8})
    assert cfg.non_default_values() == {"learning_rate": 2e-4, "network_dim": 8}


def test_namespace_view_has_every_flat_key():
    cfg = parse_config({"learning_rate": 3e-4, "network_dim": 4})
    ns = cfg.to_namespace()
    assert isinstance(ns, argparse.Namespace)
    assert ns.learning_rate == 3e-4 and ns.network_dim == 4 and ns.datasets is cfg.datasets
    for cls in FLAT_SECTIONS.values():
        for name in cls.model_fields:
            assert hasattr(ns, name), name


def test_sections_are_typed_objects():
    cfg = parse_config({"network_dim": 4})
    assert type(cfg.network).__name__ == "NetworkConfig" and cfg.network.network_dim == 4


# ---- TOML writer and round trip ---------------------------------------------------------------------------


def test_dump_toml_round_trip_of_every_supported_kind():
    data = {
        "s": 'quote " backslash \\ newline \n tab \t unicode é \x01',
        "i": -3, "f": 1e-5, "g": 2.0, "big": 1.5e300, "t": True, "n": None, "p": Path("/a/b c"),
        "lst": [1, 2.5, "x", [True, False]], "empty": [],
        "key with space": 1,
        "table": {"a": 1, "nested": {"b": "c"}, "inline_list": [{"x": 1}, 2]},
        "aot": [{"name": "one", "sub": {"k": 1}}, {"name": "two"}],
    }
    text = dump_toml(data)
    back = tomllib.loads(text)
    expected = {k: v for k, v in data.items() if v is not None}
    expected["p"] = "/a/b c"
    expected["table"] = {"a": 1, "nested": {"b": "c"}, "inline_list": [{"x": 1}, 2]}
    assert back == expected


def test_format_value_rejects_unknown_types():
    with pytest.raises(TypeError):
        format_value(object())


def test_special_floats():
    back = tomllib.loads(dump_toml({"a": float("inf"), "b": float("-inf"), "c": 3.0}))
    assert back == {"a": float("inf"), "b": float("-inf"), "c": 3.0}


def test_resolved_config_round_trips_through_toml(tmp_path):
    data = {
        "target_model": "wan22", "dit": "low.safetensors", "dit_high_noise": "high.safetensors",
        "learning_rate": 2e-4, "lr_warmup_steps": 0.05, "optimizer_args": ["weight_decay=0.01", "betas=(0.9,0.99)"],
        "network_dim": 8, "validation_timesteps": "200, 600",
        "datasets": {
            "general": {"resolution": [512, 288], "batch_size": 2},
            "train": [{"image_directory": "img", "num_repeats": 3},
                      {"video_directory": "vid", "target_frames": [1, 17], "batch_size": 1}],
            "val": [{"image_directory": "val"}],
            "latent_cache": {"device": "cpu"},
        },
        "sample_prompts": [{"text": "a \"quoted\" cat", "frames": 5}, {"text": "a dog"}],
    }
    cfg = parse_config(data, config_dir=tmp_path)
    text = cfg.to_toml()
    again = parse_config(tomllib.loads(text), config_dir=tmp_path / "other")
    assert again.to_dict() == cfg.to_dict()
    assert again.datasets.train[1].model_fields_set == cfg.datasets.train[1].model_fields_set
    assert again.model.dit == tmp_path / "low.safetensors"  # absolute paths survive a different folder
    assert "dit_high_noise" in text and "[[datasets.train]]" in text and "[[sample_prompts]]" in text


def test_wan_trainer_config_defaults_build_without_a_file():
    cfg = WanTrainerConfig()
    assert cfg.config_path is None and tomllib.loads(cfg.to_toml())["seed"] == 42


def test_array_item_of_the_wrong_kind():
    assert one_problem({"sample_prompts": ["a cat"]}) == '`sample_prompts[0]` must be a table, got "a cat" (a string)'
    assert one_problem({"datasets": 5}).startswith("`datasets` must be a table")


def test_value_check_inside_a_validator_names_the_key():
    message = one_problem({"validation_timesteps": [100, 2000]})
    assert message.startswith("`validation_timesteps`:") and "0..1000" in message and "2000" in message


def test_top_level_key_after_an_array_table_is_explained():
    message = one_problem({"sample_prompts": [{"text": "a"}, {"text": "b", "sample_every_n_steps": 100}]})
    assert message.startswith("`sample_every_n_steps` is a top-level key but was found in the 2nd [[sample_prompts]] table")


def test_method_settings_the_chosen_method_never_reads_are_errors():
    problems = problems_of({"timestep_sampling": "uniform", "discrete_flow_shift": 5.0, "huber_c": 0.3,
                            "mode_scale": 1.0, "logit_std": 2.0})
    assert [p.split(" ")[0] for p in problems] == ["`discrete_flow_shift`", "`logit_std`", "`mode_scale`", "`huber_c`"]
    assert 'timestep_sampling = "uniform"' in problems[0] and 'loss_type = "mse"' in problems[3]
    # read by the chosen methods, or left at the default: fine
    parse_config({"timestep_sampling": "shift", "discrete_flow_shift": 5.0, "loss_type": "huber", "huber_c": 0.3,
                  "weighting_scheme": "logit_normal", "logit_std": 2.0, "mode_scale": 1.29})
