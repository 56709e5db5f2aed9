"""Typed run configuration: dataclasses loaded from YAML with field-named validation errors.

`loader` holds the generic machinery; each section has its own module (`data`, `model`, `parallel`,
`train`) and `run` composes them.
"""
from .data import DataConfig, expand_shard_path, expand_shard_paths, parse_split
from .model import ModelConfig, load_model_config
from .loader import ConfigError, apply_overrides, from_dict, load_yaml, require, to_dict

__all__ = ["ConfigError", "DataConfig", "ModelConfig", "apply_overrides", "expand_shard_path", "expand_shard_paths",
           "from_dict", "load_model_config", "load_yaml", "parse_split", "require", "to_dict"]
