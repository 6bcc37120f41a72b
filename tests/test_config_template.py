"""The generated template: in sync with the shipped file, complete, and every shipped config parses."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from wantrainer.config import (
    FLAT_SECTIONS,
    DatasetEntry,
    LatentCacheConfig,
    TextEncoderCacheConfig,
)
from wantrainer.config.describe import is_table_list
from wantrainer.config.template import render_template
from wantrainer.config_parser import load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "configs" / "examples" / "full_config_template.toml"
REGENERATE = "wantrainer config template --output configs/examples/full_config_template.toml"


def test_shipped_template_matches_the_schema():
    fresh = render_template()
    shipped = SHIPPED.read_text(encoding="utf-8") if SHIPPED.is_file() else ""
    assert shipped == fresh, f"{SHIPPED.name} is out of date with the schema; regenerate it with: {REGENERATE}"


def test_template_lists_every_key_with_its_doc():
    text = render_template()
    from wantrainer.config.describe import model_in

    tables = [model_in(f.annotation) for c in FLAT_SECTIONS.values() for f in c.model_fields.values()
              if is_table_list(f.annotation)]
    for cls in [*FLAT_SECTIONS.values(), DatasetEntry, LatentCacheConfig, TextEncoderCacheConfig, *tables]:
        for name, field in cls.model_fields.items():
            written = f"\n[[{name}]]\n" if is_table_list(field.annotation) else f"\n{name} ="
            commented = f"\n# [[{name}]]\n" if is_table_list(field.annotation) else f"\n# {name} ="
            assert written in text or commented in text, f"{cls.__name__}.{name} missing"
            assert field.description, f"{cls.__name__}.{name} has no docstring"
            first_line = field.description.strip().splitlines()[0]
            assert f"# {first_line}" in text, f"doc of {cls.__name__}.{name} missing"
    for header in ("[datasets.general]", "[[datasets.train]]", "[[datasets.val]]", "[datasets.latent_cache]",
                   "[datasets.text_encoder_cache]", "[[sample_prompts]]"):
        assert f"\n{header}\n" in text, header


def test_template_parses_to_the_defaults(tmp_path):
    data = tomllib.loads(render_template())
    cfg = parse_config(data, config_dir=tmp_path)
    changed = cfg.non_default_values()
    # Only the example sample prompt differs; output_dir is written with its default value.
    assert set(changed) <= {"sample_prompts", "output_dir"}
    assert cfg.saving.output_dir == tmp_path / "output"
    assert len(cfg.datasets.train) == 2 and len(cfg.datasets.val) == 1


def test_template_documents_type_and_unset_keys():
    text = render_template()
    assert "# Type: an integer; >= 1.\nmax_train_steps = 1600" in text
    assert "# Type: a path; unset by default.\n# dit =" in text
    assert '# Type: one of "constant", "constant_with_warmup"' in text


def test_template_command_writes_the_file(tmp_path):
    from wantrainer.cli import main

    out = tmp_path / "t.toml"
    assert main(["config", "template", "--output", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == render_template()


def test_template_command_prints(capsys):
    from wantrainer.cli import main

    assert main(["config", "template"]) == 0
    assert capsys.readouterr().out == render_template()


SHIPPED_CONFIGS = sorted((ROOT / "configs").rglob("*.toml"))


def test_examples_are_shipped():
    names = {p.name for p in SHIPPED_CONFIGS}
    assert {"wan21_t2v_14b_lora.toml", "wan21_t2v_1.3b_lora.toml", "wan22_t2v_a14b_lora.toml",
            "wan21_i2v_14b_lora.toml", "wan22_i2v_a14b_lora.toml", "full_config_template.toml"} <= names


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_parses(path):
    cfg = load_config(path)
    assert cfg.config_path == path


def test_wan22_example_uses_both_experts():
    cfg = load_config(ROOT / "configs" / "examples" / "wan22_t2v_a14b_lora.toml")
    assert cfg.model.target_model == "wan22"
    assert cfg.model.dit is not None and cfg.model.dit_high_noise is not None
    assert cfg.model.timestep_boundary is not None and cfg.network.dual_lora_mode == "separate"


def test_14b_example_fits_24gb_settings():
    cfg = load_config(ROOT / "configs" / "examples" / "wan21_t2v_14b_lora.toml")
    assert cfg.model.weight_dtype == "fp8_scaled" and cfg.model.blocks_to_swap > 0 and cfg.model.gradient_checkpointing
    assert cfg.sampling.sample_prompts


def test_i2v_examples_set_their_image_inputs():
    wan21 = load_config(ROOT / "configs" / "examples" / "wan21_i2v_14b_lora.toml")
    assert wan21.model.clip is not None and all(p.image is not None for p in wan21.sampling.sample_prompts)
    wan22 = load_config(ROOT / "configs" / "examples" / "wan22_i2v_a14b_lora.toml")
    assert wan22.model.clip is None and wan22.model.target_model == "wan22" and wan22.model.dit_high_noise
    assert wan22.model.timestep_boundary is None  # the model type's default (900) applies
    assert all(p.image is not None for p in wan22.sampling.sample_prompts)


def test_ti2v_5b_example_fits_the_wan22_vae_grid():
    from wantrainer.dataset.blueprint import resolve_datasets

    cfg = load_config(ROOT / "configs" / "examples" / "wan22_ti2v_5b_lora.toml")
    assert cfg.model.dit_high_noise is None and cfg.model.timestep_boundary is None
    assert "wan2.2_vae" in str(cfg.model.vae) and cfg.model.ti2v_image_ratio is not None
    for split in ("train", "val"):
        assert all(s.latent_stride == 16 for s in resolve_datasets(cfg.datasets, split, "ti2v"))
    prompts = cfg.sampling.sample_prompts
    assert all(p.width % 32 == 0 and p.height % 32 == 0 and (p.frames - 1) % 4 == 0 for p in prompts)
    assert {p.image is None for p in prompts} == {True, False}  # text-to-video and image-to-video samples
