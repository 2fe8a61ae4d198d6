"""Configs: one typed, validated ``Config`` per task, from a complete YAML preset plus ``--set`` overrides.

``loader`` reads and validates (every key checked against the schema, one line per problem);
``schema`` holds the sections as plain dataclasses; ``scaling`` holds every phi -> number rule that is
not the backbone's or the detector's own (those are ``backbones.get_preset`` and
``heads.efficientdet_preset``); ``presets`` finds the shipped presets by name.
"""

from .loader import ConfigError, load, resolve_image_size, save, schema_for, to_dict, validate
from .presets import list_presets, resolve_preset
from .schema import (IMAGENET_MEAN, IMAGENET_STD, ClassificationConfig, Config, DetectionConfig, SegmentationConfig)

__all__ = ["Config", "ClassificationConfig", "SegmentationConfig", "DetectionConfig", "ConfigError", "load",
           "save", "to_dict", "validate", "resolve_image_size", "schema_for", "IMAGENET_MEAN", "IMAGENET_STD",
           "list_presets", "resolve_preset"]
