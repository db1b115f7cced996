"""Each config field's docstring, read from the source (``SAEConfig`` and ``RunConfig`` keep them
under the fields, as sparsify does): the sweep-file reference in the docs and the CLI's ``--help``
both print these, so a key is explained in one place."""

import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing

from trainer.config import RunConfig, SAEConfig


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """``{field: its docstring}``, whitespace joined into one paragraph ("" where it has none)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, following in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            text = following.value.value if (isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                                             and isinstance(following.value.value, str)) else ""
            docs[node.target.id] = " ".join(text.split())
    return {f.name: docs.get(f.name, "") for f in dataclasses.fields(cls)}


def _type(cls: type, name: str) -> str:
    """A field's type as a reader writes it in TOML."""
    hint = typing.get_type_hints(cls, include_extras=True)[name]
    if typing.get_origin(hint) is typing.Literal:
        return " | ".join(f'"{v}"' for v in typing.get_args(hint))
    kinds = {int: "int", float: "float", str: "string", bool: "bool", type(None): "unset"}
    found = []
    for arg in _leaves(hint):
        found.append(kinds.get(arg, "list" if typing.get_origin(arg) is tuple else getattr(arg, "__name__", str(arg))))
    return " | ".join(dict.fromkeys(found))


def _leaves(hint) -> list:
    origin = typing.get_origin(hint)
    if origin is typing.Annotated:
        return _leaves(typing.get_args(hint)[0])
    if origin in (typing.Union, types.UnionType):
        return [leaf for arg in typing.get_args(hint) for leaf in _leaves(arg)]
    if origin is typing.Literal:
        return [type(typing.get_args(hint)[0])]
    return [hint]


def _default(field: dataclasses.Field) -> str:
    value = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    if value is None:
        return "unset"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return "[" + ", ".join(map(str, value)) + "]"
    return f"{value:_}" if isinstance(value, int) else f"{value:g}"


def reference_markdown() -> str:
    """The sweep file's every key: a table for ``[run]`` and one for ``[[sae]]``."""
    parts = []
    for table, cls in (("[run]", RunConfig), ("[[sae]]", SAEConfig)):
        docs = field_docs(cls)
        parts.append(f"## `{table}`\n\n{' '.join((cls.__doc__ or '').split())}\n\n| key | type | default | meaning |\n|---|---|---|---|")
        for field in dataclasses.fields(cls):
            meaning = docs[field.name].replace("|", "\\|")
            parts.append(f"| `{field.name}` | {_type(cls, field.name).replace('|', '&#124;')} | `{_default(field)}` | {meaning} |")
        parts.append("")
    return "\n".join(parts)
