"""Typed configs: dataclasses loaded from YAML, with dotted command-line overrides.

Every command and workflow declares its settings as (nested) dataclasses. ``load_config``
reads a YAML file, applies overrides such as ``train.lr=1e-5``, and builds the dataclass,
checking each key against the declared fields and types. A typo, a wrong type or an
out-of-range value raises ``UserError`` with one line that names the key, where it came
from, and for a typo the closest valid key, so the CLI can exit 2 without a traceback.

Ranges are declared next to the field with ``bounded(default, ge=..., le=...)``; choices
with ``typing.Literal``.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

from probe_dpo.errors import UserError

T = TypeVar("T")


def bounded(default: Any, *, ge: float | None = None, gt: float | None = None,
            le: float | None = None, lt: float | None = None) -> Any:
    """A dataclass field with an inclusive/exclusive numeric range checked on load."""
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    return dataclasses.field(default=default, metadata={"bounds": bounds})


def load_config(cls: type[T], path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> T:
    """Build ``cls`` from an optional YAML file plus ``key.sub=value`` overrides."""
    data: dict[str, Any] = {}
    source = "command line"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise UserError(f"config file {path}: cannot read it ({exc.strerror or exc})") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark is not None else ""
            raise UserError(f"config file {path}: not valid YAML{at}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise UserError(f"config file {path}: the top level must be a mapping of keys, not {type(loaded).__name__}")
        data = loaded or {}
    given: dict[str, str] = {}
    for item in overrides:
        given[_apply_override(cls, data, item)] = item
    return from_dict(cls, data, Source(source, given) if given else source)


class Source(str):
    """Where a config's values came from: a file (or "command line") plus the ``key=value``
    overrides applied over it, so an error names the command line for a key an override set
    (and the file for the others). It is the file's name as a string."""

    def __new__(cls, default: str, overrides: dict[str, str] | None = None) -> "Source":
        obj = super().__new__(cls, default)
        obj.overrides = dict(overrides or {})
        return obj

    def at(self, key: str) -> str:
        """The source of ``key`` (dotted, list indices allowed): an override that set it or a key
        above it, else the file."""
        plain = re.sub(r"\[\d+\]", "", key)
        for dotted, item in self.overrides.items():
            if plain == dotted or plain.startswith(dotted + "."):
                return f"command line ({item!r})"
        return str(self)


def _at(source: str, key: str) -> str:
    return source.at(key) if isinstance(source, Source) else source


def from_dict(cls: type[T], data: dict[str, Any], source: str = "config", prefix: str = "") -> T:
    """Build a dataclass from a plain mapping, checking keys, types and ranges."""
    if not isinstance(data, dict):
        raise UserError(f"{_at(source, prefix.rstrip('.'))}: key {prefix.rstrip('.') or '<top>'} must be a mapping, "
                        f"got {_describe(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = get_type_hints(cls)
    for key in data:
        if key not in fields:
            raise UserError(f"{_at(source, prefix + key)}: unknown key {prefix}{key}{suggest_key(key, fields, prefix)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = convert_value(value, hints[name], source, f"{prefix}{name}")
        check_bounds(fields[name], kwargs[name], source, f"{prefix}{name}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:  # raised by a __post_init__ cross-field check
        named = re.match(r"key ([\w.\[\]-]+)", str(exc))  # the convention: "key a.b: ..."
        raise UserError(f"{_at(source, named.group(1)) if named else source}: {exc}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML-ready mapping of a config (for saving it next to the run it produced)."""
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _apply_override(cls: type, data: dict[str, Any], item: str) -> str:
    where = f"command line ({item!r})"
    if "=" not in item:
        raise UserError(f"{where}: expected key=value, for example train.lr=1e-5")
    dotted, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    set_dotted(cls, data, dotted.strip(), value, where)
    return dotted.strip()


def set_dotted(cls: type, data: dict[str, Any], dotted: str, value: Any, where: str) -> None:
    """Set ``data[a][b][c] = value`` for ``dotted`` = ``a.b.c``, a key path of the config class
    ``cls`` (an unknown key is a UserError naming ``where``, with the closest valid key).
    The value is checked later, when ``from_dict`` builds the config."""
    keys = dotted.split(".")
    node, node_cls = data, cls
    for depth, key in enumerate(keys):
        prefix = ".".join(keys[:depth])
        prefix = prefix + "." if prefix else ""
        if node_cls is None or not dataclasses.is_dataclass(node_cls):
            raise UserError(f"{where}: {prefix.rstrip('.')} has no sub-keys")
        fields = {f.name: f for f in dataclasses.fields(node_cls) if f.init}
        if key not in fields:
            raise UserError(f"{where}: unknown key {prefix}{key}{suggest_key(key, fields, prefix)}")
        if depth == len(keys) - 1:
            node[key] = value
            return
        hint = get_type_hints(node_cls)[key]
        if get_origin(hint) is dict:  # a free mapping (e.g. trl.logging_steps=10): the rest is one key
            child = node.get(key)
            if not isinstance(child, dict):
                child = {}
                node[key] = child
            child[".".join(keys[depth + 1:])] = value
            return
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node, node_cls = child, _dataclass_in(get_type_hints(node_cls)[key])


def _dataclass_in(hint: Any) -> type | None:
    if dataclasses.is_dataclass(hint):
        return hint
    for arg in get_args(hint):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def suggest_key(key: str, fields: dict[str, Any], prefix: str) -> str:
    close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.6)
    if close:
        return f" (did you mean {prefix}{close[0]}?)"
    return f" (valid keys: {', '.join(prefix + name for name in fields)})"


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if not isinstance(value, (dict, list)) else type(value).__name__


def convert_value(value: Any, hint: Any, source: str, key: str) -> Any:
    """Check ``value`` against the type hint, with the few coercions YAML needs."""
    origin = get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(hint)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert_value(value, arg, source, key)
            except UserError:
                continue
        raise UserError(f"{_at(source, key)}: key {key} must be {_type_name(hint)}, got {_describe(value)}")
    if origin is Literal:
        if value in get_args(hint):
            return value
        choices = ", ".join(repr(a) for a in get_args(hint))
        names = {a.lower(): a for a in get_args(hint) if isinstance(a, str)}
        close = difflib.get_close_matches(value.lower(), list(names), n=1, cutoff=0.6) if isinstance(value, str) else []
        hint_text = f" (did you mean {names[close[0]]}?)" if close else ""
        raise UserError(f"{_at(source, key)}: key {key} must be one of {choices}, got {value!r}{hint_text}")
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, source, key + ".")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{_at(source, key)}: key {key} must be a list, got {_describe(value)}")
        args = get_args(hint)
        item_hint = args[0] if args else Any
        items = [convert_value(v, item_hint, source, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{_at(source, key)}: key {key} must be a mapping, got {_describe(value)}")
        _, vhint = get_args(hint) or (str, Any)
        return {str(k): convert_value(v, vhint, source, f"{key}.{k}") for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    elif isinstance(value, hint):
        return value
    raise UserError(f"{_at(source, key)}: key {key} must be {_type_name(hint)}, got {_describe(value)}")


def _type_name(hint: Any) -> str:
    if get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(hint))
    if hint is type(None):
        return "null"
    if get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(hint))
    if get_origin(hint) in (list, tuple):
        return "a list"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint)))


def check_bounds(field: dataclasses.Field, value: Any, source: str, key: str) -> None:
    bounds = field.metadata.get("bounds")
    if not bounds or value is None:
        return
    tests = {"ge": (lambda v, b: v >= b, ">="), "gt": (lambda v, b: v > b, ">"),
             "le": (lambda v, b: v <= b, "<="), "lt": (lambda v, b: v < b, "<")}
    for name, bound in bounds.items():
        ok, sign = tests[name]
        if not ok(value, bound):
            raise UserError(f"{_at(source, key)}: key {key} must be {sign} {bound}, got {value!r}")


def field_docs(cls: type) -> dict[str, str]:
    """Each field's description: the string literal right below it in the class body (the
    convention of every config here), read from the source."""
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for stmt, nxt in zip(body, body[1:] + [None]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def describe(cfg: Any, prefix: str = "") -> list[tuple[str, Any, str, bool]]:
    """``(dotted key, value, description, is_section)`` of every field of a config, in declaration
    order; a nested config is a section row followed by its own fields."""
    rows = []
    docs = field_docs(type(cfg))
    for f in dataclasses.fields(cfg):
        if not f.init:
            continue
        value = getattr(cfg, f.name)
        key = prefix + f.name
        section = dataclasses.is_dataclass(value)
        rows.append((key, None if section else value, docs.get(f.name, ""), section))
        if section:
            rows += describe(value, key + ".")
    return rows


def show(cfg: Any) -> str:
    """The resolved config as YAML, every key with its description as a comment."""
    lines = []
    for key, value, doc, section in describe(cfg):
        text = "  " * key.count(".") + key.rsplit(".", 1)[-1] + ":"
        if not section:
            text += " " + yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...")
        lines.append(f"{text:<48} # {doc}" if doc else text)
    return "\n".join(lines) + "\n"
