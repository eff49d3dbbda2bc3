"""Command-line flags generated from a typed dataclass (the CleanRL / tyro way): one flag per
field, its type from the annotation, its help from the docstring under the field. The CLI then
never re-declares what the dataclass says, and a new field is a new flag."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import typing
from typing import Any, Dict, Iterable, Mapping, Optional


def field_docs(cls) -> Dict[str, str]:
    """The string literal under each field of ``cls``'s class body."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str)):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _scalar_type(annotation) -> Any:
    """``Optional[X]`` -> ``X``."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if typing.get_origin(annotation) is typing.Union and len(args) == 1 else annotation


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, *, exclude: Iterable[str] = (),
                        extra_help: Optional[Mapping[str, str]] = None, metavars: Optional[Mapping[str, str]] = None) -> None:
    """A flag per field of ``cls`` (``--calibration-seed`` for ``calibration_seed``). A bool that
    defaults to True becomes ``--no-NAME``; one that defaults to False, ``--NAME``."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    extra_help, metavars = dict(extra_help or {}), dict(metavars or {})
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        kind = _scalar_type(hints[f.name])
        help_text = " ".join(p for p in (docs.get(f.name, ""), extra_help.get(f.name, "")) if p)
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            if default:
                parser.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false",
                                    help=f"Turn off: {help_text[:1].lower()}{help_text[1:]}" if help_text else None)
            else:
                parser.add_argument(flag, dest=f.name, action="store_true", help=help_text)
            continue
        shown = f" (default: {default})" if default is not None else ""
        parser.add_argument(flag, dest=f.name, type=kind, default=default, metavar=metavars.get(f.name),
                            help=(help_text + shown).replace("%", "%%"))


def dataclass_from_namespace(cls, namespace: argparse.Namespace, **fixed: Any):
    """``cls`` built from the parsed flags (and ``fixed`` values for excluded fields)."""
    values = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls) if hasattr(namespace, f.name)}
    return cls(**{**values, **fixed})
