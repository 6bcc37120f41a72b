"""Config schema: one typed section per group of keys. See ``wantrainer.config_parser`` for loading."""

from .base import Section
from .datasets import DatasetEntry, DatasetsConfig, LatentCacheConfig, TextEncoderCacheConfig
from .metadata import MetadataConfig
from .model import ModelConfig
from .output import LoggingConfig, SamplePrompt, SamplingConfig, SavingConfig, ValidationConfig
from .training import LossConfig, NetworkConfig, OptimizerConfig, TimestepConfig, TrainingConfig

# Top-level (flat) TOML keys, grouped into sections. Order is the order of the template.
CORE_SECTIONS: dict[str, type[Section]] = {
    "model": ModelConfig,
    "training": TrainingConfig,
    "optimizer": OptimizerConfig,
    "network": NetworkConfig,
    "timesteps": TimestepConfig,
    "loss": LossConfig,
    "saving": SavingConfig,
    "metadata": MetadataConfig,
    "logging": LoggingConfig,
    "validation": ValidationConfig,
    "sampling": SamplingConfig,
}


def _compose() -> dict[str, type[Section]]:
    """The core sections, then every enhancement's own section (``enhancements/<feature>/config.py``)."""
    from ..enhancements.registry import feature_sections

    sections = dict(CORE_SECTIONS)
    owners = {key: name for name, cls in sections.items() for key in cls.model_fields}
    for name, cls in feature_sections().items():
        if name in sections:
            raise ValueError(f"enhancement section {name!r} has the name of a core section")
        for key in cls.model_fields:
            if key in owners:
                raise ValueError(f"enhancement {name!r} declares the key {key!r}, already a key of {owners[key]!r}")
            owners[key] = name
        sections[name] = cls
    return sections


FLAT_SECTIONS: dict[str, type[Section]] = _compose()
FEATURE_SECTIONS: dict[str, type[Section]] = {k: v for k, v in FLAT_SECTIONS.items() if k not in CORE_SECTIONS}

__all__ = [
    "CORE_SECTIONS",
    "FEATURE_SECTIONS",
    "FLAT_SECTIONS",
    "DatasetEntry",
    "DatasetsConfig",
    "LatentCacheConfig",
    "LoggingConfig",
    "LossConfig",
    "MetadataConfig",
    "ModelConfig",
    "NetworkConfig",
    "OptimizerConfig",
    "SamplePrompt",
    "SamplingConfig",
    "SavingConfig",
    "Section",
    "TextEncoderCacheConfig",
    "TimestepConfig",
    "TrainingConfig",
    "ValidationConfig",
]
