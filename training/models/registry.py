"""Model registry: models register a config class and a constructor under their name.

The registry imports no model: ``training/models/__init__.py`` imports every model module (which
runs their ``@register``), and importing this module runs that package first."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from mtrank.spec import FeatureSpec, SpecError
from training.models.base import InputShape, MultiTaskModel

_REGISTRY: dict[str, tuple[type, Callable[..., MultiTaskModel]]] = {}


def register(name: str, config_cls: type):
    """Class decorator: ``@register("ple", PLEConfig)`` on a ``MultiTaskModel`` subclass."""

    def wrap(model_cls):
        _REGISTRY[name] = (config_cls, model_cls)
        model_cls.kind = name
        return model_cls

    return wrap


def model_names() -> list[str]:
    return sorted(_REGISTRY)


def make_config(name: str, values: dict[str, Any] | None = None):
    """The model's config dataclass from a dict; unknown keys are an error naming them."""
    if name not in _REGISTRY:
        raise SpecError(f"unknown model {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    config_cls = _REGISTRY[name][0]
    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SpecError(f"model {name!r}: unknown config keys {unknown}; known: {sorted(known)}")
    return config_cls(**values)


def create_model(name: str, spec: FeatureSpec, shape: InputShape, config: Any = None) -> MultiTaskModel:
    if not dataclasses.is_dataclass(config):
        config = make_config(name, config)
    return _REGISTRY[name][1](spec, shape, config)
