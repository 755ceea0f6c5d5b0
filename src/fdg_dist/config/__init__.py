"""The one typed configuration (layer 0): the schema every layer reads, and the paper's table.

``from fdg_dist.config import Config`` keeps working: the schema's names are re-exported here.
Must not import any other part of fdg_dist: every layer imports this one.
"""

from fdg_dist.config.schema import (
    BACKENDS,
    CIFAR_CLASSES,
    CORRECTED_METHODS,
    CORRECTORS,
    DATASETS,
    FLOAT32_MAX,
    METHODS,
    MIN_TIMEOUT_S,
    NAN_POLICIES,
    OPTIMIZERS,
    PRECISIONS,
    SCHEDULERS,
    SEED_MAX,
    SHRINKING_METHODS,
    SPLIT_COSTS,
    STASH_MODES,
    TEXT_TOKENS,
    CheckpointConfig,
    Config,
    ConfigError,
    CorrectorConfig,
    DataConfig,
    DistConfig,
    LoggingConfig,
    MethodConfig,
    ModelConfig,
    OptimConfig,
    PipelineConfig,
    SchedConfig,
    TrainerConfig,
    staleness_options,
)

__all__ = ["BACKENDS", "CIFAR_CLASSES", "CORRECTED_METHODS", "CORRECTORS", "DATASETS", "FLOAT32_MAX", "METHODS",
           "MIN_TIMEOUT_S", "NAN_POLICIES", "OPTIMIZERS", "PRECISIONS", "SCHEDULERS", "SEED_MAX", "SHRINKING_METHODS",
           "SPLIT_COSTS", "STASH_MODES", "TEXT_TOKENS", "CheckpointConfig", "Config", "ConfigError",
           "CorrectorConfig", "DataConfig", "DistConfig", "LoggingConfig", "MethodConfig", "ModelConfig",
           "OptimConfig", "PipelineConfig", "SchedConfig", "TrainerConfig", "staleness_options"]
