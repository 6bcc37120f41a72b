"""README.md cannot drift from the code: its TOML parses, its commands and options exist, its keys are keys."""

from __future__ import annotations

import re
import tomllib
import typing
from pathlib import Path

import pytest

from wantrainer.cli import COMMANDS, build_parser
from wantrainer.config import (
    FLAT_SECTIONS,
    DatasetEntry,
    LatentCacheConfig,
    SamplePrompt,
    TextEncoderCacheConfig,
)
from wantrainer.config_parser import parse_config

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
# README.md and docs/*.md are checked as one text: a key, command or option written anywhere must exist.
README = "\n\n".join(p.read_text(encoding="utf-8") for p in [ROOT / "README.md", *DOCS])
# Pages whose backticked snake_case words are `network_args` entries, tensor, tool, hook and function names, not
# keys.
NETWORK_ARGS_PAGES = {"adapters.md", "tools.md", "full_finetune.md", "ui.md", "enhancements.md"}
KEY_TEXT = "\n\n".join(p.read_text(encoding="utf-8") for p in [ROOT / "README.md", *DOCS]
                        if p.name not in NETWORK_ARGS_PAGES)

FENCE = re.compile(r"^[ \t]*```(\w*)\n(.*?)^[ \t]*```", re.S | re.M)
TOML_BLOCKS = [m.group(2) for m in FENCE.finditer(README) if m.group(1) == "toml"]
CODE_BLOCKS = [m.group(2) for m in FENCE.finditer(README)]
PROSE = FENCE.sub("", README)
INLINE_CODE = re.findall(r"`([^`\n]+)`", PROSE)
KEY_INLINE_CODE = re.findall(r"`([^`\n]+)`", FENCE.sub("", KEY_TEXT))
KEY_TOML_BLOCKS = [m.group(2) for m in FENCE.finditer(KEY_TEXT) if m.group(1) == "toml"]

# Snake-case words in backticks that are not config keys nor values of a config key.
NOT_KEYS = {
    "cache_latents",  # the function the caching benchmark times
    "grad_norm",
    "samples_per_sec",  # TensorBoard tags
    "scaled_fp8",
    "scale_weight",
    "scale_input",
    "weight_scale",
    "input_scale",
    "comfy_quant",  # DiT file tensors
    "frame_count",  # cache-file metadata
    "model_type",  # cache-file metadata (the model type a cache serves)
    "vae_type",  # cache-file metadata (the VAE that made a cache)
    "img_emb",
    "k_img",
    "v_img",
    "norm_k_img",  # DiT file tensors of the Wan 2.1 I2V image branch
    "image_dim",
    "pos_embed_seq_len",
    "add_v_proj",  # diffusers WanTransformer3DModel names
    "expand_timesteps",  # diffusers Wan pipeline argument (TI2V-5B)
    "enable_tread",
    "tread_config_route1",  # Takenoko's TREAD keys, read by `config import --from takenoko`
    "noisy",
    "s",
    "t",  # names in formulas
}
METADATA_PREFIXES = ("ss_", "sshs_", "modelspec.")


def _schema_keys() -> set[str]:
    classes = [*FLAT_SECTIONS.values(), DatasetEntry, LatentCacheConfig, TextEncoderCacheConfig, SamplePrompt]
    return {name for cls in classes for name in cls.model_fields}


def _literal_values(annotation: typing.Any) -> set[str]:
    if typing.get_origin(annotation) is typing.Literal:
        return {v for v in typing.get_args(annotation) if isinstance(v, str)}
    return {v for arg in typing.get_args(annotation) for v in _literal_values(arg)}


def _schema_values() -> set[str]:
    classes = [*FLAT_SECTIONS.values(), DatasetEntry, LatentCacheConfig, TextEncoderCacheConfig, SamplePrompt]
    return {v for cls in classes for f in cls.model_fields.values() for v in _literal_values(f.annotation)}


def test_readme_has_toml_blocks():
    assert len(TOML_BLOCKS) >= 5


def test_readme_links_to_docs_resolve():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    linked = set(re.findall(r"\]\((docs/[\w.-]+\.md)", text))
    assert linked == {f"docs/{p.name}" for p in DOCS}, "every docs/ page is linked from the README and exists"
    for page in DOCS:
        for target in re.findall(r"\]\(([\w.-]+\.md)", page.read_text(encoding="utf-8")):
            assert (ROOT / "docs" / target).is_file(), f"{page.name} links to missing {target}"


@pytest.mark.parametrize("index", range(len(TOML_BLOCKS)))
def test_readme_toml_block_parses(index, tmp_path):
    block = TOML_BLOCKS[index]
    parse_config(tomllib.loads(block), config_dir=tmp_path)  # raises ConfigError naming every problem


def _command_uses() -> list[str]:
    """Every ``wantrainer <command> [args]`` written as code (inline or in a code block), up to the line end."""
    uses = []
    for text in [*CODE_BLOCKS, *INLINE_CODE]:
        uses += [m.group(1) for m in re.finditer(r"(?:^|[\s(])wantrainer ([a-z][^\n#`]*)", text, re.M)]
    return uses


def test_readme_commands_exist():
    names = {cmd.name for cmd in COMMANDS}
    uses = _command_uses()
    assert len(uses) >= 10
    unknown = {use.split()[0] for use in uses} - names
    assert not unknown, f"README names commands that `wantrainer` lacks: {sorted(unknown)}"


def test_readme_command_options_exist():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.choices and "train" in a.choices).choices
    wrong = []
    for use in _command_uses():
        name = use.split()[0]
        known = set(subparsers[name]._option_string_actions) if name in subparsers else set()
        wrong += [
            f"wantrainer {name} {opt}"
            for opt in re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", use)
            if opt not in known
        ]
    assert not wrong, f"README shows options the commands lack: {wrong}"


def test_readme_backticked_keys_are_schema_keys():
    keys, values = _schema_keys(), _schema_values()
    written = set()
    for code in KEY_INLINE_CODE:
        assignment = re.fullmatch(r"([a-z][a-z0-9_]*) = [^=].*", code)
        if assignment:
            written.add(assignment.group(1))
        elif re.fullmatch(r"[a-z][a-z0-9]*(_[a-z0-9]+)+", code):
            written.add(code)
    for block in KEY_TOML_BLOCKS:
        written |= set(re.findall(r"^\s*([a-z][a-z0-9_]*)\s*=", block, re.M))
    unknown = sorted(k for k in written - keys - values - NOT_KEYS if not k.startswith(METADATA_PREFIXES))
    assert not unknown, f"README writes these as config keys but the schema has none of them: {unknown}"
    shown = {code.split(" = ")[0] for code in KEY_INLINE_CODE}
    stale_allow = sorted(k for k in NOT_KEYS if k in keys or k not in shown)
    assert not stale_allow, f"allow-list entries that are keys or no longer in README: {stale_allow}"
