"""Config dataclasses <-> argparse: one ``--flag`` per field, help and default from the field.

Field metadata read here: ``help``; ``group`` (the ``--help`` section; titles and order from the class's
``ARG_GROUPS`` when it has one); ``metavar`` (grouped fields default to N / X / TEXT). Defaults are shown only when they say something (not None / empty).
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import fields

_METAVARS = {int: "N", float: "X", str: "TEXT"}


def _help(text: str, default) -> str:
    if default is None or default == "" or default == () or default == []:
        return text
    shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
    return f"{text} (default: {shown})"


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """One ``--flag`` per dataclass field (``help`` from the field metadata, default from the field), in argument
    groups by the fields' ``group`` metadata (fields without one go to the parser itself)."""
    hints = typing.get_type_hints(cls)
    titles: dict[str, str] = dict(getattr(cls, "ARG_GROUPS", None) or {})
    chosen = [f for f in fields(cls) if f.name not in skip]
    used = {f.metadata.get("group") for f in chosen} - {None}
    order = [g for g in titles if g in used] + sorted(used - set(titles))
    groups = {g: parser.add_argument_group(titles.get(g, g)) for g in order}
    for g in order:  # fields in their declaration order within each section
        for f in (f for f in chosen if f.metadata.get("group") == g):
            _add_field(groups[g], f, hints[f.name])
    for f in (f for f in chosen if f.metadata.get("group") is None):
        _add_field(parser, f, hints[f.name])


def _add_field(target, f: dataclasses.Field, tp) -> None:
    flag = "--" + f.name.replace("_", "-")
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if type(None) in args:
        tp = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    help_text = _help(f.metadata.get("help", ""), default)
    metavar = f.metadata.get("metavar")
    short = "group" in f.metadata  # grouped (trainer) flags get short metavars: --resolution N, not RESOLUTION
    if tp is bool:
        target.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
    elif origin in (list, tuple):
        item = args[0] if args else str
        target.add_argument(flag, nargs="*", type=item, default=default, help=help_text,
                            metavar=metavar or (_METAVARS.get(item, "VALUE") if short else None))
    else:
        kind = tp if tp in (int, float, str) else str
        target.add_argument(flag, type=kind, default=default, help=help_text,
                            metavar=metavar or (_METAVARS[kind] if short else None))


def dataclass_from_namespace(cls, ns: argparse.Namespace, **overrides):
    """Build (and validate) a config dataclass from parsed arguments."""
    kwargs = {f.name: getattr(ns, f.name) for f in fields(cls) if hasattr(ns, f.name)}
    kwargs.update(overrides)
    for f in fields(cls):
        if f.name in kwargs and isinstance(f.default, tuple) and isinstance(kwargs[f.name], list):
            kwargs[f.name] = tuple(kwargs[f.name])
    return cls(**kwargs)


def _omega(value: str):
    return int(value) if value.isdigit() else value


def add_dr2_options(g) -> None:
    """DR2's sampling options (the same in ``bfr restore``, ``bfr demo`` and ``bfr eval``)."""
    g.add_argument("--n", type=float, default=2.0, help="low-pass factor N (latent px for --space latent)")
    g.add_argument("--tau", type=int, default=35, help="output level tau (of --steps levels)")
    g.add_argument("--omega", type=_omega, default="auto", help="start level: auto | official | an integer")
    g.add_argument("--steps", type=int, default=100, help="T of the respaced schedule (default 100)")
    g.add_argument("--space", choices=["latent", "pixel"], default="latent", help="where Phi_N is applied")
