"""Model registry: models register a config class and a constructor under their name.

The registry imports no model: ``mtrank/training/models/__init__.py`` imports every model module (which
runs their ``@register``), and importing this module runs that package first."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from mtrank.spec import FeatureSpec, SpecError, validate
from mtrank.training.models.base import InputShape, MultiTaskModel

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


def make_config(name: str, values: dict[str, Any] | None = None, source: str = "model config"):
    """The model's config dataclass from a dict, validated strictly (exact literals, real numbers,
    the class's own checks); any error is one :class:`SpecError` line ``<source>: model.<key>: ...``."""
    if name not in _REGISTRY:
        raise SpecError(f"unknown model {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    config_cls = _REGISTRY[name][0]
    if values is not None and not isinstance(values, dict):
        raise SpecError(f"{source}: model: expected a mapping of config keys, got {type(values).__name__}")
    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SpecError(f"{source}: model.{unknown[0]}: unknown config key of model {name!r}; known: {sorted(known)}")
    return validate(config_cls, values, source, prefix="model.")


def create_model(name: str, spec: FeatureSpec, shape: InputShape, config: Any = None) -> MultiTaskModel:
    if not dataclasses.is_dataclass(config):
        config = make_config(name, config)
    return _REGISTRY[name][1](spec, shape, config)
