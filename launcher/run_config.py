"""Fields of a run config YAML read on a login node: the file plus its `section.field=value` overrides
(the last one wins), without megalm.config, which would import torch. The one reader the launcher has
(sbatch's run directory, the elastic node-count rule)."""
from __future__ import annotations

from typing import Any

import yaml


def config_values(config: str, overrides: list[str], defaults: dict[str, Any],
                  error: type[Exception] = ValueError) -> dict[str, Any]:
    """{"section.field": value} for each key of `defaults` (its value when the config leaves it out);
    an unreadable file, bad YAML or a bad override value raises `error` naming it."""
    try:
        with open(config) as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise error(f"--config {config}: cannot read it ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise error(f"--config {config}: not valid YAML: {e}") from None
    values = {}
    for key, default in defaults.items():
        section, name = key.split(".")
        part = data.get(section) if isinstance(data, dict) else None
        values[key] = part.get(name, default) if isinstance(part, dict) else default
    for item in overrides:
        key, sep, raw = item.partition("=")
        if sep and key.strip() in values:
            try:
                values[key.strip()] = yaml.safe_load(raw)
            except yaml.YAMLError:
                raise error(f"override {item!r}: value is not valid YAML") from None
    return values
