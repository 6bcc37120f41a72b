"""TOML file -> validated, typed config.

Top-level keys are flat (``learning_rate = 1e-4``); in code they are grouped into typed sections
(``cfg.optimizer.learning_rate``). ``[datasets.*]`` tables form ``cfg.datasets``. Every problem in a file is
collected and reported at once as a ``ConfigError`` (exit code 2).
"""

from __future__ import annotations

import argparse
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from .common.logger import setup_logging
from .config import CORE_SECTIONS, FEATURE_SECTIONS, FLAT_SECTIONS, DatasetsConfig, Section
from .config.datasets import DatasetEntry, LatentCacheConfig, TextEncoderCacheConfig
from .config.messages import check_kinds, format_error, unknown_key_message
from .config.metadata import MetadataConfig
from .config.model import ModelConfig
from .config.output import LoggingConfig, SamplingConfig, SavingConfig, ValidationConfig
from .config.toml_writer import dump_toml
from .config.training import LossConfig, NetworkConfig, OptimizerConfig, TimestepConfig, TrainingConfig
from .errors import ConfigError

# Keys that hold a folder or a hub id: resolved as a path only when they look like one.
_PATH_OR_ID_KEYS = {"t5_tokenizer"}


@dataclass
class WanTrainerConfig:
    """The whole validated config. Components receive their own section, not this object."""

    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    timesteps: TimestepConfig = field(default_factory=TimestepConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    saving: SavingConfig = field(default_factory=SavingConfig)
    metadata: MetadataConfig = field(default_factory=MetadataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    datasets: DatasetsConfig = field(default_factory=DatasetsConfig)
    features: dict[str, Section] = field(default_factory=lambda: {n: c() for n, c in FEATURE_SECTIONS.items()})
    """Each enhancement's own section (``enhancements/<feature>/config.py``), also read as ``cfg.<feature>``."""
    config_path: Path | None = None
    """The TOML file this came from (None when built from a dict)."""
    config_dir: Path = field(default_factory=Path.cwd)
    """Relative paths in the file were resolved against this folder."""
    raw: dict[str, Any] = field(default_factory=dict)
    """The TOML document as written by the user."""

    def __getattr__(self, name: str) -> Any:
        features = self.__dict__.get("features", {})
        if name in features:
            return features[name]
        raise AttributeError(f"{type(self).__name__!r} has no section {name!r}")

    def sections(self) -> dict[str, Section]:
        return {name: getattr(self, name) for name in FLAT_SECTIONS}

    def to_namespace(self) -> argparse.Namespace:
        """A flat ``argparse.Namespace`` view of every top-level key, plus ``datasets``."""
        flat: dict[str, Any] = {}
        for section in self.sections().values():
            flat.update({name: getattr(section, name) for name in type(section).model_fields})
        flat["datasets"] = self.datasets
        flat["config_path"] = self.config_path
        return argparse.Namespace(**flat)

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as TOML-ready data: every top-level key (defaults included, unset ones left out)
        and the dataset tables as written (unset dataset keys stay unset so [datasets.general] still applies)."""
        data: dict[str, Any] = {}
        for section in self.sections().values():
            data.update(section.model_dump(mode="python"))
        datasets = self.datasets
        data["datasets"] = {
            "general": datasets.general.model_dump(exclude_unset=True),
            "train": [entry.model_dump(exclude_unset=True) for entry in datasets.train],
            "val": [entry.model_dump(exclude_unset=True) for entry in datasets.val],
            "latent_cache": datasets.latent_cache.model_dump(),
            "text_encoder_cache": datasets.text_encoder_cache.model_dump(),
        }
        return data

    def to_toml(self) -> str:
        """The resolved config as a TOML document (saved beside LoRA files and training states)."""
        return dump_toml(self.to_dict())

    def non_default_values(self) -> dict[str, Any]:
        """Top-level keys set in the file whose value differs from the schema default."""
        changed: dict[str, Any] = {}
        for section in self.sections().values():
            default = type(section)()
            for name in type(section).model_fields:
                if name not in section.model_fields_set:
                    continue
                value = getattr(section, name)
                if value != getattr(default, name):
                    changed[name] = value
        return changed


def all_flat_keys() -> dict[str, str]:
    """Map every top-level key to the name of its section."""
    return {key: section for section, cls in FLAT_SECTIONS.items() for key in cls.model_fields}


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> WanTrainerConfig:
    """Read, validate and resolve a TOML config file. Raises ``ConfigError`` listing every problem.

    ``overrides``: top-level keys from the command line ({key: text or [texts]}, see ``config.overrides``);
    they replace the file's values before validation, so they are checked exactly as TOML values."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ConfigError([f"{path} is a folder: give the path of a .toml config file"], source=str(path))
    if not path.is_file():
        raise ConfigError([f"config file not found: {path}"], source=str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"the file is not UTF-8 text: {exc}"], source=str(path)) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([_toml_error_message(exc, text)], source=str(path)) from None
    if not overrides:
        return parse_config(data, config_dir=path.resolve().parent, source=str(path), config_path=path.resolve())
    from .config.overrides import override_values

    values = override_values(overrides)
    try:
        return parse_config({**data, **values}, config_dir=path.resolve().parent,
                            source=f"{path} with the command line", config_path=path.resolve())
    except ConfigError as exc:
        raise ConfigError([_name_flag(p, values) for p in exc.problems], source=exc.source) from None


def _name_flag(problem: str, values: dict[str, Any]) -> str:
    """Add "(from --key)" to a problem about a key that the command line set."""
    for key in values:
        if re.search(rf"`{re.escape(key)}\b", problem):
            return f"{problem} (from --{key})"
    return problem


def load_config_for_command(args: argparse.Namespace) -> WanTrainerConfig:
    """Load ``args.config`` with the command line's key overrides and apply its ``logging_level``: the first call
    of every command that takes a config."""
    cfg = load_config(args.config, overrides=args.overrides)
    setup_logging(cfg.logging.logging_level)
    return cfg


def _toml_error_message(exc: tomllib.TOMLDecodeError, text: str) -> str:
    message = str(exc)
    found = re.search(r"\(at line (\d+), column (\d+)\)", message)
    if not found:
        return f"malformed TOML: {message}"
    line_no, column = int(found.group(1)), int(found.group(2))
    reason = message[: found.start()].strip()
    lines = text.splitlines()
    shown = lines[line_no - 1] if 0 < line_no <= len(lines) else ""
    return f"malformed TOML at line {line_no}, column {column}: {reason}\n      {line_no} | {shown}"


def parse_config(
    data: dict[str, Any],
    config_dir: str | Path | None = None,
    source: str | None = None,
    config_path: Path | None = None,
) -> WanTrainerConfig:
    """Validate a TOML document (already parsed into a dict). Every problem is reported in one ``ConfigError``."""
    config_dir = Path(config_dir) if config_dir is not None else Path.cwd()
    problems: list[str] = []
    failed: set[str] = set()
    key_to_section = all_flat_keys()

    grouped: dict[str, dict[str, Any]] = {name: {} for name in FLAT_SECTIONS}
    for key, value in data.items():
        if key == "datasets":
            continue
        if key in key_to_section:
            grouped[key_to_section[key]][key] = value
        else:
            problems.append(_unknown_top_level_message(key, value, key_to_section))

    built: dict[str, Section] = {}
    for name, cls in FLAT_SECTIONS.items():
        built[name] = _validate_section(cls, grouped[name], "", problems, failed)

    datasets_raw = data.get("datasets", {})
    if isinstance(datasets_raw, list):
        problems.append("[[datasets]] (musubi-tuner's layout) is not ours: write each training dataset as a "
                        "[[datasets.train]] table (validation data: [[datasets.val]]), or convert the file with "
                        "`wantrainer config import --from musubi`")
        datasets_raw = {}
    elif not isinstance(datasets_raw, dict):
        problems.append("`datasets` must be a table: use [datasets.general], [[datasets.train]], [[datasets.val]]")
        datasets_raw = {}
    datasets = _validate_section(DatasetsConfig, datasets_raw, "datasets.", problems, failed)

    cfg = WanTrainerConfig(
        **{k: v for k, v in built.items() if k in CORE_SECTIONS}, datasets=datasets,
        features={k: v for k, v in built.items() if k not in CORE_SECTIONS}, config_path=config_path,
        config_dir=config_dir, raw=data,
    )  # type: ignore[arg-type]
    _resolve_paths(cfg, config_dir)
    # Cross-field checks run on the valid keys; a check that names a key already reported is left out.
    for problem in cross_field_problems(cfg):
        if not any(re.search(rf"`{re.escape(key)}\b", problem) for key in failed):
            problems.append(problem)
    if problems:
        raise ConfigError(problems, source=source)
    return cfg


def _unknown_top_level_message(key: str, value: Any, key_to_section: dict[str, str]) -> str:
    if key == "general" and isinstance(value, dict):
        return ("unknown table [general]: the settings shared by every dataset go in [datasets.general] here "
                "(musubi-tuner's [general]); rename the header")
    if isinstance(value, dict):
        inside = [k for k in value if k in key_to_section]
        if inside:
            keys = ", ".join(f"`{k}`" for k in inside)
            return (f"unknown table [{key}]: top-level keys are not grouped in tables; move {keys} above the "
                    "first [table] header and remove the header")
    if key in DatasetEntry.model_fields:
        return (f"unknown top-level key `{key}`: dataset settings go in [datasets.general] or in a "
                "[[datasets.train]] / [[datasets.val]] table")
    return unknown_key_message(key, sorted(key_to_section) + ["datasets"])


def _validate_section(
    cls: type[Section], values: dict[str, Any], prefix: str, problems: list[str], failed: set[str]
) -> Any:
    """Validate one section. Keys with problems are reported, added to ``failed`` and left at their default."""
    before = len(problems)
    kept = check_kinds(cls, values, prefix, problems)
    failed.update(prefix + k for k in values if k not in kept)
    if len(problems) > before:
        failed.update(prefix + k for k in values if any(f"`{prefix}{k}" in p for p in problems[before:]))
    try:
        return cls.model_validate(kept)
    except ValidationError as exc:
        flat = all_flat_keys()
        messages = [format_error(cls, err, prefix, flat) for err in exc.errors()]
        problems.extend(dict.fromkeys(messages))  # union branches can repeat the same message
        bad = {err["loc"][0] for err in exc.errors() if err.get("loc")}
        failed.update(f"{prefix}{k}" for k in bad)
    try:
        return cls.model_validate({k: v for k, v in kept.items() if k not in bad})
    except ValidationError:
        return cls.model_construct()


def _resolve(path: Path, base: Path) -> Path:
    path = path.expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def _resolve_model_paths(model: BaseModel, base: Path) -> None:
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, Path):
            object.__setattr__(model, name, _resolve(value, base))
        elif isinstance(value, BaseModel):
            _resolve_model_paths(value, base)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, BaseModel):
                    _resolve_model_paths(item, base)
        elif name in _PATH_OR_ID_KEYS and isinstance(value, str) and _looks_like_path(value, base):
            object.__setattr__(model, name, str(_resolve(Path(value), base)))


def _looks_like_path(value: str, base: Path) -> bool:
    return value.startswith(("~", ".", "/")) or (base / value).exists() or "\\" in value


def _resolve_paths(cfg: WanTrainerConfig, base: Path) -> None:
    for section in cfg.sections().values():
        _resolve_model_paths(section, base)
    _resolve_model_paths(cfg.datasets, base)


def unused_setting_problems(cfg: WanTrainerConfig) -> list[str]:
    """Timestep / loss settings changed from their default although the chosen method never reads them."""
    t, loss = cfg.timesteps, cfg.loss
    sampling = f'timestep_sampling = "{t.timestep_sampling}"'
    logit_users = t.timestep_sampling in ("logit_normal", "logsnr", "qinglong") or t.weighting_scheme == "logit_normal"
    rules = [  # (section, key, is it read?, the method chosen now, the methods that read it)
        (t, "discrete_flow_shift", t.timestep_sampling == "shift", sampling, '"shift"'),
        (t, "sigmoid_scale", t.timestep_sampling in ("sigmoid", "shift", "flux_shift", "qinglong"), sampling,
         '"sigmoid", "shift", "flux_shift" and "qinglong"'),
        (t, "logit_mean", logit_users, sampling, '"logit_normal", "logsnr", "qinglong" and weighting_scheme = '
         '"logit_normal"'),
        (t, "logit_std", logit_users, sampling, '"logit_normal", "logsnr", "qinglong" and weighting_scheme = '
         '"logit_normal"'),
        (t, "mode_scale", t.weighting_scheme == "mode", f'weighting_scheme = "{t.weighting_scheme}"', '"mode"'),
        (loss, "huber_c", loss.loss_type in ("huber", "pseudo_huber"), f'loss_type = "{loss.loss_type}"',
         '"huber" and "pseudo_huber"'),
    ]
    problems = []
    for section, key, used, current, users in rules:
        value, default = getattr(section, key), type(section).model_fields[key].default
        if not used and value != default:
            problems.append(f"`{key}` = {value} has no effect with {current} (it is read by {users}); remove it "
                            "or pick a method that uses it")
    return problems


def tread_problems(m: Any) -> list[str]:
    """The TREAD span keys without routing, or a span that ends before it starts (the block count is checked
    when the DiT is loaded)."""
    span_keys = [k for k in ("tread_start_layer_idx", "tread_end_layer_idx")
                 if getattr(m, k) != type(m).model_fields[k].default]
    if m.tread_selection_ratio == 0:
        return [f"`{k}` = {getattr(m, k)} has no effect with `tread_selection_ratio` = 0 (routing off); set a "
                "ratio such as 0.5 or remove it" for k in span_keys]
    start, end = m.tread_start_layer_idx, m.tread_end_layer_idx
    if (start < 0) == (end < 0) and start > end:
        return [f"`tread_start_layer_idx` = {start} is after `tread_end_layer_idx` = {end}: the routed span "
                "runs from the start block to the end block (included)"]
    return []


def cross_field_problems(cfg: WanTrainerConfig) -> list[str]:
    """Checks that involve more than one key. Returns every problem found."""
    problems: list[str] = []
    m, t = cfg.model, cfg.timesteps
    if t.min_timestep is not None and t.max_timestep is not None and t.min_timestep >= t.max_timestep:
        problems.append(
            f"`min_timestep` ({t.min_timestep}) must be below `max_timestep` ({t.max_timestep})"
        )
    legacy = "fp8_scaled" if m.fp8_scaled else "fp8" if m.fp8_base else None
    if legacy is not None and m.dit_weight_dtype not in ("auto", legacy):
        old = "fp8_scaled" if m.fp8_scaled else "fp8_base"
        problems.append(f'`dit_weight_dtype` = "{m.dit_weight_dtype}" and `{old}` = true disagree; keep only '
                        f'`dit_weight_dtype` (`{old}` = true means dit_weight_dtype = "{legacy}")')
    if m.fp8_matmul and m.weight_dtype not in ("fp8", "fp8_scaled"):
        problems.append('`fp8_matmul` needs fp8 weights: set dit_weight_dtype = "fp8_scaled" (or "fp8")')
    if m.gradient_checkpointing_cpu_offload and not m.gradient_checkpointing:
        problems.append("`gradient_checkpointing_cpu_offload` needs `gradient_checkpointing = true`")
    problems.extend(tread_problems(m))
    if m.dit_high_noise is not None and m.target_model != "wan22":
        problems.append('`dit_high_noise` is only used with `target_model = "wan22"`')
    warm = cfg.optimizer.lr_warmup_steps
    if isinstance(warm, float) and not warm.is_integer() and warm >= 1:
        problems.append(f"`lr_warmup_steps` = {warm}: use an integer step count or a fraction below 1")
    problems.extend(unused_setting_problems(cfg))
    from .networks.args import (  # the checks `train` makes
        engine_problems,
        full_model_problems,
        network_problems,
    )

    problems.extend(network_problems(cfg.network))
    problems.extend(full_model_problems(cfg.model, cfg.network))
    problems.extend(engine_problems(cfg))
    sp, v = cfg.sampling, cfg.validation
    if (sp.sample_at_first or sp.sample_every_n_steps or sp.sample_every_n_epochs) and not sp.sample_prompts:
        problems.append("`sample_at_first` / `sample_every_n_steps` / `sample_every_n_epochs` need at least one "
                        "[[sample_prompts]] table (with `text`); add one or remove the trigger")
    if (v.validate_every_n_steps or v.validate_on_epoch_end) and not cfg.datasets.val:
        problems.append("`validate_every_n_steps` / `validate_on_epoch_end` need a [[datasets.val]] dataset; "
                        "add one (and cache it) or remove the trigger")
    from .dataset.blueprint import blueprint_problems

    problems.extend(blueprint_problems(cfg.datasets))
    for section in cfg.features.values():  # an enhancement's checks that read other sections
        check = getattr(section, "config_problems", None)
        if check is not None:
            problems.extend(check(cfg))
    return problems


__all__ = [
    "ConfigError",
    "DatasetEntry",
    "LatentCacheConfig",
    "TextEncoderCacheConfig",
    "WanTrainerConfig",
    "all_flat_keys",
    "cross_field_problems",
    "load_config",
    "load_config_for_command",
    "parse_config",
]
