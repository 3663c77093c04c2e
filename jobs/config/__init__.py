"""Job configuration: YAML files plus ``--set key=value`` overrides, validated into typed objects.

The schema lives here (a module per part of it); ``configs/*.yaml`` hold values only. Every
problem is reported as one line that names the key, e.g. ``render.num_frames: must be >= 1
(got 0)``. The names below are what the rest of reelfarm imports.
"""

from jobs.config.base import ConfigError, redact
from jobs.config.files import load_config, validate, with_absolute_paths
from jobs.config.fingerprint import OUTPUT_SECTIONS, fingerprint, fingerprint_fields
from jobs.config.job import JobConfig
from jobs.config.quality import DEDUP_THRESHOLD, DedupConfig, QualityConfig, RuleConfig
from jobs.config.sections import (ClusterConfig, EncodeConfig, InputConfig, LimitsConfig,
                                  MetricsConfig, ModelConfig, OptimizeConfig, OutputConfig,
                                  RenderConfig, WebDatasetConfig)
from jobs.config.stages import (ResourcesConfig, StageConfig, StageRenderConfig,
                                TextStageConfig, WorkerRange)

__all__ = ["ClusterConfig", "ConfigError", "DEDUP_THRESHOLD", "DedupConfig", "EncodeConfig",
           "InputConfig", "JobConfig", "LimitsConfig", "MetricsConfig", "ModelConfig",
           "OUTPUT_SECTIONS", "OptimizeConfig", "OutputConfig", "QualityConfig", "RenderConfig",
           "ResourcesConfig", "RuleConfig", "StageConfig", "StageRenderConfig",
           "TextStageConfig", "WebDatasetConfig", "WorkerRange", "fingerprint",
           "fingerprint_fields", "load_config", "redact", "validate", "with_absolute_paths"]
