"""Encoders and decoders registered by name; a new modality is one file with a decorator."""

from __future__ import annotations

from typing import Callable, TypeVar

from engine.config import ConfigError

from .base import Decoder, Encoder

ENCODERS: dict[str, type[Encoder]] = {}
DECODERS: dict[str, type[Decoder]] = {}
T = TypeVar("T")


def _register(table: dict, kind: str, name: str) -> Callable[[T], T]:
    def wrap(cls: T) -> T:
        if name in table and table[name] is not cls:
            raise ValueError(f"{kind} name {name!r} is already registered by {table[name].__qualname__}; pick another")
        table[name] = cls
        cls.registered_name = name
        return cls
    return wrap


def register_encoder(name: str):
    return _register(ENCODERS, "encoder", name)


def register_decoder(name: str):
    return _register(DECODERS, "decoder", name)


def get_encoder(name: str) -> type[Encoder]:
    if name not in ENCODERS:
        raise ConfigError(f"unknown encoder {name!r}; registered encoders: {', '.join(sorted(ENCODERS)) or 'none'} "
                          "(register one with @register_encoder, and import its module via model.plugins)")
    return ENCODERS[name]


def get_decoder(name: str) -> type[Decoder]:
    if name not in DECODERS:
        raise ConfigError(f"unknown decoder {name!r}; registered decoders: {', '.join(sorted(DECODERS)) or 'none'} "
                          "(register one with @register_decoder, and import its module via model.plugins)")
    return DECODERS[name]
