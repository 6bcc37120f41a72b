"""Config schema: one typed section per group of keys. See ``wantrainer.config_parser`` for loading."""

from .base import Section
from .datasets import DatasetEntry, DatasetsConfig, LatentCacheConfig, TextEncoderCacheConfig
from .metadata import MetadataConfig
from .model import ModelConfig
from .output import LoggingConfig, SamplePrompt, SamplingConfig, SavingConfig, ValidationConfig
from .training import LossConfig, NetworkConfig, OptimizerConfig, TimestepConfig, TrainingConfig

# Top-level (flat) TOML keys, grouped into sections. Order is the order of the template.
FLAT_SECTIONS: dict[str, type[Section]] = {
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

__all__ = [
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
