"""A search space's entries in Ray Tune's terms: the samplers ``search.space`` may name, each
entry checked and normalised when the config loads, and the values a training config must
accept for it (checked before any compute)."""

from __future__ import annotations

from typing import Any

# Tune's samplers a search space may name: the arguments each takes (in the order of Tune's call).
SAMPLERS = {"uniform": ("lo", "hi"), "loguniform": ("lo", "hi"), "quniform": ("lo", "hi", "q"),
            "qloguniform": ("lo", "hi", "q"), "randint": ("lo", "hi"), "choice": ("values",),
            "grid_search": ("values",)}
ALIASES = {"grid": "grid_search"}  # the name the list form used first


def check_sampler(key: str, value: Any) -> dict:
    """One ``search.space`` entry checked (its sampler's name and arguments) and normalised to
    Tune's form ``{name: [args]}`` (``{choice: [values]}``; bounds as numbers: YAML 1.1 reads 1e-6
    as a string); ValueError ``key <key>: ...`` otherwise."""
    import difflib

    usage = ("{loguniform|uniform: [lo, hi]}, {quniform|qloguniform: [lo, hi, q]}, {randint: [lo, hi]} or "
             "{choice|grid_search: [values]} (or the list form [loguniform, lo, hi], [choice, [values]])")
    if isinstance(value, dict):
        if len(value) != 1:
            raise ValueError(f"key {key}: one sampler per key, e.g. {{loguniform: [1.0e-6, 1.0e-4]}}, got "
                             f"{sorted(map(str, value))}")
        (name, args), = value.items()
        name = str(name)
        if SAMPLERS.get(ALIASES.get(name, name)) == ("values",):
            args = [args]
        elif not isinstance(args, (list, tuple)):
            args = [args]
    elif isinstance(value, (list, tuple)) and value and isinstance(value[0], str):
        name, args = value[0], list(value[1:])
    else:
        raise ValueError(f"key {key}: expected {usage}, got {value!r}")
    name = ALIASES.get(name, name)
    if name not in SAMPLERS:
        close = difflib.get_close_matches(name, list(SAMPLERS), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else f" (valid: {', '.join(SAMPLERS)})"
        raise ValueError(f"key {key}: unknown sampler {name!r}{hint}")
    if SAMPLERS[name] == ("values",):
        if len(args) != 1 or not isinstance(args[0], (list, tuple)) or not args[0]:
            raise ValueError(f"key {key}: {name} takes one non-empty list of values, e.g. {{{name}: [0.1, 0.3]}}, "
                             f"got {value!r}")
        return {name: [yaml_number(v) for v in args[0]]}
    wanted = SAMPLERS[name]
    if len(args) != len(wanted):
        example = {"randint": "[1, 5]", "quniform": "[0.0, 2.0, 0.5]", "qloguniform": "[1.0e-6, 1.0e-4, 1.0e-6]"}
        raise ValueError(f"key {key}: {name} takes {len(wanted)} numbers ({', '.join(wanted)}), e.g. "
                         f"{{{name}: {example.get(name, '[1.0e-6, 1.0e-4]')}}}, got {value!r}")
    numbers = []
    for arg in args:
        number = None
        if not isinstance(arg, bool):
            try:
                number = float(arg)
            except (TypeError, ValueError):
                pass
        if number is None or number != number or number in (float("inf"), float("-inf")):
            raise ValueError(f"key {key}: the arguments of {name} must be finite numbers, got {arg!r}")
        numbers.append(number)
    lo, hi = numbers[:2]
    if name == "randint":
        if not all(n.is_integer() for n in numbers):
            raise ValueError(f"key {key}: randint takes integer bounds, got {list(args)!r}")
        numbers = [int(n) for n in numbers]
    if not lo < hi:
        raise ValueError(f"key {key}: {name} needs lo < hi, got {lo!r} and {hi!r}")
    if "log" in name and lo <= 0:
        raise ValueError(f"key {key}: {name} needs positive bounds, got lo = {lo!r}")
    if "q" in wanted and not numbers[2] > 0:
        raise ValueError(f"key {key}: {name} needs a positive q, got {numbers[2]!r}")
    return {name: numbers}


def yaml_number(value: Any) -> Any:
    """A value of a list as a number when YAML 1.1 left it a string (it reads 1e-5 as one)."""
    import re

    if isinstance(value, str) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+", value.strip()):
        return float(value)
    return value


def sampler_values(entry: dict) -> list:
    """The values of a normalised ``search.space`` entry a training config must accept: every
    value of a list, a range's bounds (randint's upper bound is excluded)."""
    (name, args), = entry.items()
    if SAMPLERS[name] == ("values",):
        return list(args)
    if name == "randint":
        return [args[0], args[1] - 1]
    return list(args[:2])
