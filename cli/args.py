"""Config dataclasses <-> argparse: one ``--flag`` per field, help and default from the field."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import fields


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """One ``--flag`` per dataclass field (``help`` from the field metadata, default from the field)."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        tp = hints[f.name]
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        optional = type(None) in args
        if optional:
            tp = next(a for a in args if a is not type(None))
            origin, args = typing.get_origin(tp), typing.get_args(tp)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f.metadata.get("help", "")
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=f"{help_text} (default: {default})")
        elif origin in (list, tuple):
            parser.add_argument(flag, nargs="*", type=args[0] if args else str, default=default,
                                help=f"{help_text} (default: {default})")
        else:
            parser.add_argument(flag, type=tp if tp in (int, float, str) else str, default=default,
                                help=f"{help_text} (default: {default})")


def dataclass_from_namespace(cls, ns: argparse.Namespace, **overrides):
    """Build (and validate) a config dataclass from parsed arguments."""
    kwargs = {f.name: getattr(ns, f.name) for f in fields(cls) if hasattr(ns, f.name)}
    kwargs.update(overrides)
    for f in fields(cls):
        if f.name in kwargs and isinstance(f.default, tuple) and isinstance(kwargs[f.name], list):
            kwargs[f.name] = tuple(kwargs[f.name])
    return cls(**kwargs)
