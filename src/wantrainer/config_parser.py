"""TOML file -> validated, typed config.

Top-level keys are flat (``learning_rate = 1e-4``); in code they are grouped into typed sections
(``cfg.optimizer.learning_rate``). ``[datasets.*]`` tables form ``cfg.datasets``. Every problem in a file is
collected and reported at once as a ``ConfigError`` (exit code 2).
"""

from __future__ import annotations

import argparse
import difflib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from .config import FLAT_SECTIONS, DatasetsConfig, Section
from .config.datasets import DatasetEntry
from .config.datasets import LatentCacheConfig, TextEncoderCacheConfig
from .config.model import ModelConfig
from .config.output import LoggingConfig, SamplingConfig, SavingConfig, ValidationConfig
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
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    datasets: DatasetsConfig = field(default_factory=DatasetsConfig)
    config_path: Path | None = None
    """The TOML file this came from (None when built from a dict)."""
    config_dir: Path = field(default_factory=Path.cwd)
    """Relative paths in the file were resolved against this folder."""
    raw: dict[str, Any] = field(default_factory=dict)
    """The TOML document as written by the user."""

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

    def non_default_values(self) -> dict[str, Any]:
        """Top-level keys whose value differs from the schema default."""
        changed: dict[str, Any] = {}
        for section in self.sections().values():
            default = type(section)()
            for name in type(section).model_fields:
                value = getattr(section, name)
                if value != getattr(default, name):
                    changed[name] = value
        return changed


def all_flat_keys() -> dict[str, str]:
    """Map every top-level key to the name of its section."""
    return {key: section for section, cls in FLAT_SECTIONS.items() for key in cls.model_fields}


def load_config(path: str | Path) -> WanTrainerConfig:
    """Read, validate and resolve a TOML config file. Raises ``ConfigError`` listing every problem."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError([f"config file not found: {path}"], source=str(path))
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"malformed TOML: {exc}"], source=str(path)) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"the file is not UTF-8 text: {exc}"], source=str(path)) from None
    return parse_config(data, config_dir=path.resolve().parent, source=str(path), config_path=path.resolve())


def parse_config(
    data: dict[str, Any],
    config_dir: str | Path | None = None,
    source: str | None = None,
    config_path: Path | None = None,
) -> WanTrainerConfig:
    """Validate a TOML document (already parsed into a dict)."""
    config_dir = Path(config_dir) if config_dir is not None else Path.cwd()
    problems: list[str] = []
    key_to_section = all_flat_keys()
    valid_top = sorted(key_to_section) + ["datasets"]

    grouped: dict[str, dict[str, Any]] = {name: {} for name in FLAT_SECTIONS}
    for key, value in data.items():
        if key == "datasets":
            continue
        if key in key_to_section:
            grouped[key_to_section[key]][key] = value
        else:
            problems.append(_unknown_key_message(key, valid_top, prefix=""))

    built: dict[str, Section] = {}
    for name, cls in FLAT_SECTIONS.items():
        built[name] = _validate_section(cls, grouped[name], prefix="", problems=problems)

    datasets_raw = data.get("datasets", {})
    if not isinstance(datasets_raw, dict):
        problems.append("`datasets` must be a table: use [datasets.general], [[datasets.train]], [[datasets.val]]")
        datasets_raw = {}
    datasets = _validate_section(DatasetsConfig, datasets_raw, prefix="datasets.", problems=problems)

    if problems:
        raise ConfigError(problems, source=source)

    cfg = WanTrainerConfig(
        **built, datasets=datasets, config_path=config_path, config_dir=config_dir, raw=data
    )  # type: ignore[arg-type]
    _resolve_paths(cfg, config_dir)
    problems.extend(cross_field_problems(cfg))
    if problems:
        raise ConfigError(problems, source=source)
    return cfg


def _validate_section(cls: type[Section], values: dict[str, Any], prefix: str, problems: list[str]) -> Any:
    try:
        return cls.model_validate(values)
    except ValidationError as exc:
        for err in exc.errors():
            problems.append(_format_error(cls, err, prefix))
        return cls.model_construct()


def _format_error(cls: type[BaseModel], err: dict[str, Any], prefix: str) -> str:
    loc = err.get("loc", ())
    key = prefix + _loc_to_key(loc)
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        parent_cls = _model_at(cls, loc[:-1])
        valid = sorted(parent_cls.model_fields) if parent_cls is not None else []
        parent = prefix + _loc_to_key(loc[:-1])
        return _unknown_key_message(str(loc[-1]), valid, prefix=f"{parent}." if parent else prefix)
    if kind == "missing":
        return f"`{key}` is required but missing"
    value = err.get("input")
    msg = err.get("msg", "invalid value")
    msg = msg.replace("Value error, ", "")
    return f"`{key}`: {msg} (got {value!r}, a {_type_name(value)})"


def _loc_to_key(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("int", "str", "list[int]", "float"):
            # Union branch names that pydantic puts in the location: not part of the key.
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def _model_at(cls: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """Follow a pydantic error location down nested models to the model that holds the last key."""
    current: Any = cls
    for part in loc:
        if isinstance(part, int):
            continue
        fld = current.model_fields.get(part) if isinstance(current, type) else None
        if fld is None:
            return None
        ann = fld.annotation
        inner = getattr(ann, "__args__", None)
        candidates = [ann] + list(inner or [])
        nxt = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nxt is None:
            return None
        current = nxt
    return current if isinstance(current, type) else None


def _unknown_key_message(key: str, valid: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f"; did you mean `{prefix}{close[0]}`?" if close else "; see `wantrainer config template` for every key"
    return f"unknown key `{prefix}{key}`{hint}"


def _type_name(value: Any) -> str:
    return {str: "string", int: "integer", float: "number", bool: "boolean", list: "list", dict: "table"}.get(
        type(value), type(value).__name__
    )


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


def cross_field_problems(cfg: WanTrainerConfig) -> list[str]:
    """Checks that involve more than one key. Returns every problem found."""
    problems: list[str] = []
    m, t, s = cfg.model, cfg.timesteps, cfg.saving
    if t.min_timestep is not None and t.max_timestep is not None and t.min_timestep >= t.max_timestep:
        problems.append(
            f"`min_timestep` ({t.min_timestep}) must be below `max_timestep` ({t.max_timestep})"
        )
    if s.resume is not None and s.auto_resume:
        problems.append("`resume` and `auto_resume` are mutually exclusive: set only one of them")
    if m.fp8_scaled and not m.fp8_base:
        problems.append("`fp8_scaled` needs `fp8_base = true`")
    if m.gradient_checkpointing_cpu_offload and not m.gradient_checkpointing:
        problems.append("`gradient_checkpointing_cpu_offload` needs `gradient_checkpointing = true`")
    if m.dit_high_noise is not None and m.target_model != "wan22":
        problems.append('`dit_high_noise` is only used with `target_model = "wan22"`')
    warm = cfg.optimizer.lr_warmup_steps
    if isinstance(warm, float) and not warm.is_integer() and warm >= 1:
        problems.append(f"`lr_warmup_steps` = {warm}: use an integer step count or a fraction below 1")
    from .dataset.blueprint import blueprint_problems

    problems.extend(blueprint_problems(cfg.datasets))
    return problems


__all__ = [
    "DatasetEntry",
    "LatentCacheConfig",
    "TextEncoderCacheConfig",
    "WanTrainerConfig",
    "all_flat_keys",
    "cross_field_problems",
    "load_config",
    "parse_config",
]
