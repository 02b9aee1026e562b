"""Command-line flags generated from a settings dataclass: one source of truth per setting.

Each field of a `FeaturesConfig` or `TrainConfig` is one flag `--name-with-dashes`, typed from its
annotation, with its help in `field(metadata={"help": ...})`: a new setting is written once.
"""

from __future__ import annotations

import argparse
import types
import typing
from dataclasses import MISSING, field, fields

from common.log import add_verbosity
from common.log import from_args as configure_logging


class Parser(argparse.ArgumentParser):
    """The parser of every entry point: no abbreviated flags (`--ste 5` is refused, not taken as
    `--steps 5`), so a typo or a replayed flag never passes for another one; `-v`/`-q` on it and on
    each subcommand (argparse's add_subparsers makes them of this class too), and `parse_args`
    configures the project's logging from them (`common.log`)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        add_verbosity(self)

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        configure_logging(parsed)
        return parsed


def add_config_args(p: argparse.ArgumentParser, cls) -> None:
    """One flag per field of dataclass `cls`. A bool is a switch; a tuple takes a comma-separated
    list; the default is appended to the help unless it is None or the help places it itself."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        flag, kind, default = "--" + f.name.replace("_", "-"), _base(hints[f.name]), f.default
        help_ = f.metadata["help"]
        if default is MISSING:
            raise TypeError(f"{cls.__name__}.{f.name} needs a default to be a flag")
        if kind is bool:
            p.add_argument(flag, action="store_true", help=help_)
            continue
        if kind is tuple:
            kind, default = _comma_list, ",".join(default)
        if default is not None and "%(default)" not in help_:
            help_ += " (default: %(default)s)"
        p.add_argument(flag, type=kind, default=default, help=help_)


def config_from(cls, args: argparse.Namespace):
    """The `cls` of parsed flags (other flags of the command are left out)."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def _base(hint):
    """int of `int | None`."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_origin(hint) or hint


def _comma_list(text: str) -> tuple:
    return tuple(text.split(","))


def setting(default, help: str):
    """A dataclass field with the help text of its flag."""
    return field(default=default, metadata={"help": help})
