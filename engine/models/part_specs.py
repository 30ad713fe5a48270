"""Part specs (the entries of model.encoders / model.decoders) into part modules: the registered
class a spec names and the options it passes, checked against the class's constructor so that
every mistake is a ConfigError naming its key (`model.encoders[0].depth`), the value and the fix.
"""

from __future__ import annotations

import collections.abc
import inspect
import math
import re
import typing

import torch.nn as nn

from engine.config import ConfigError, ModelConfig
from engine.modalities import get_decoder, get_encoder
from engine.modalities.base import PartOptionError
from engine.plugins import load_plugins

RESERVED_KEYS = ("name", "freeze", "init_from", "recipe", "loss_weight", "activation_checkpointing", "placeholder",
                 "project")


def part_specs(cfg: ModelConfig) -> list[tuple[str, int, dict]]:
    """[(kind, index in its list, spec)] for encoders then decoders."""
    return [("encoders", i, s) for i, s in enumerate(cfg.encoders)] + \
           [("decoders", i, s) for i, s in enumerate(cfg.decoders)]



def part_class(kind: str, index: int, spec: dict) -> type[nn.Module]:
    """The registered class a spec of model.encoders / model.decoders names (a ConfigError
    naming `model.encoders[0].name` if none is registered under that name)."""
    where = f"model.{kind}[{index}]"
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ConfigError(f"config key '{where}' must be a mapping with a 'name' key, got {spec!r}")
    try:
        return (get_encoder if kind == "encoders" else get_decoder)(spec["name"])
    except ConfigError as e:
        raise ConfigError(f"config key '{where}.name': {e}") from None


def check_part_names(cfg: ModelConfig) -> None:
    """Import `model.plugins` and check that every part's name is registered: cheap, so that a
    typo in a name is told before any data is prepared for the parts."""
    load_plugins(cfg.plugins, "model.plugins")
    for kind, i, spec in part_specs(cfg):
        part_class(kind, i, spec)


def build_part(kind: str, index: int, spec: dict) -> nn.Module:
    """The part a spec of model.encoders / model.decoders describes. Every mistake in the spec
    is a ConfigError naming its key (`model.encoders[0].depth`), the value and the fix."""
    where = f"model.{kind}[{index}]"
    cls = part_class(kind, index, spec)
    name = spec["name"]
    options = {k: v for k, v in spec.items() if k not in RESERVED_KEYS}
    params = inspect.signature(cls.__init__).parameters
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    unknown = [k for k in options if k not in params and not accepts_any]
    if unknown:
        valid = [p for p in params if p != "self"] + list(RESERVED_KEYS)
        raise ConfigError(f"{where} ({name}): unknown option(s) {unknown}; valid options: {valid}")
    _check_option_types(cls, options, where, name)
    try:
        return cls(**options)
    except PartOptionError as e:
        raise ConfigError(f"config key '{where}.{e.option}' ({name}): {e.problem}") from None
    except (ValueError, TypeError, ArithmeticError, RuntimeError) as e:
        # The part's own check (or torch, e.g. a negative size): name the option it mentions.
        message = " ".join(str(e).split()).removeprefix(f"{name}: ")
        mentioned = [(m.start(), k) for k in options for m in [re.search(rf"\b{re.escape(k)}\b", message)] if m]
        key = f"{where}.{min(mentioned)[1]}" if mentioned else where
        raise ConfigError(f"config key '{key}' ({name}): {message}") from None


# A part option that is an int larger than this is no tensor size (nor a count of layers).
_MAX_PART_INT = 2 ** 31 - 1


def _check_option_types(cls: type, options: dict, where: str, name: str) -> None:
    """Options against the annotations of the part's __init__ (int, float, bool, str, their
    Optional and sequences of int): a YAML typo fails here, not deep inside torch."""
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # an annotation this process cannot resolve: the part checks its options itself
        return
    for key, value in options.items():
        annotation = hints.get(key)
        if annotation is None:
            continue
        args = typing.get_args(annotation)
        if type(None) in args:
            if value is None:
                continue
            rest = [a for a in args if a is not type(None)]
            if len(rest) != 1:
                continue
            annotation = rest[0]
        expected, ok = _option_ok(annotation, value)
        if not ok:
            raise ConfigError(f"config key '{where}.{key}' ({name}) expects {expected}, got {value!r}")


def _option_ok(annotation, value) -> tuple[str, bool]:
    def integer(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and abs(v) <= _MAX_PART_INT
    if annotation is bool:
        return "bool (true or false)", isinstance(value, bool)
    if annotation is int:
        return f"an int (at most {_MAX_PART_INT})", integer(value)
    if annotation is float:
        return "a finite number", (isinstance(value, (int, float)) and not isinstance(value, bool)
                                   and math.isfinite(value))
    if annotation is str:
        return "a string", isinstance(value, str)
    origin = typing.get_origin(annotation)
    if origin in (list, tuple, collections.abc.Sequence) and typing.get_args(annotation)[:1] == (int,):
        return "a list of ints", isinstance(value, (list, tuple)) and all(integer(v) for v in value)
    return "", True
