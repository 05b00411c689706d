"""Typed dataclass configs: dotted overrides, to_dict / from_dict, flat params.

One override path (`optim.lr=1e-4 model.norm=batch_renorm`) serves the CLI and Ray Tune search
spaces. Values are parsed to the field's declared type; unknown keys and ill-typed values raise
with the list of what is valid, so a typo never trains the wrong thing silently.
"""

import dataclasses
import math
import numbers
import operator
import types
import typing


class ConfigError(ValueError):
    pass


def _fields(obj):
    return {f.name: f for f in dataclasses.fields(obj)}


def _hints(obj):
    return typing.get_type_hints(type(obj))


def parse_value(text, kind, key):
    """Parse the string `text` as `kind` (bool, int, float, str, tuple[...] or X | None)."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = [k for k in typing.get_args(kind) if k is not type(None)]
        if text.lower() in ("none", "null"):
            return None
        return parse_value(text, options[0], key)
    if origin is tuple:
        parts = [p for p in text.strip("()[] ").split(",") if p.strip()]
        args = typing.get_args(kind)
        item_types = [args[0]] * len(parts) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(item_types) != len(parts):
            raise ConfigError(f"{key}: expected {len(item_types)} comma-separated values, got {text!r}")
        return tuple(parse_value(p.strip(), t, key) for p, t in zip(parts, item_types, strict=True))
    if kind is bool:
        lowered = text.lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected true or false, got {text!r}")
    if kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            raise ConfigError(f"{key}: expected {kind.__name__}, got {text!r}") from None
    if kind is str:
        return text
    raise ConfigError(f"{key}: cannot parse a value of type {kind}")


def valid_keys(obj, prefix=""):
    """Every dotted leaf key of a (nested) dataclass instance."""
    keys = []
    for name in _fields(obj):
        value = getattr(obj, name)
        if dataclasses.is_dataclass(value):
            keys += valid_keys(value, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def set_key(obj, key, value, prefix=""):
    """Return a copy of `obj` with dotted `key` set; a str value is parsed to the field's type."""
    head, _, rest = key.partition(".")
    full = prefix + key
    if head not in _fields(obj):
        valid = ", ".join(valid_keys(obj, prefix))
        raise ConfigError(f"unknown config key {full!r}; valid keys: {valid}")
    current = getattr(obj, head)
    if rest:
        if not dataclasses.is_dataclass(current):
            raise ConfigError(f"{prefix}{head} is a value, not a section; cannot set {full!r}")
        return dataclasses.replace(obj, **{head: set_key(current, rest, value, f"{prefix}{head}.")})
    if dataclasses.is_dataclass(current):
        valid = ", ".join(valid_keys(current, full + "."))
        raise ConfigError(f"{full} is a section; set one of its keys: {valid}")
    if isinstance(value, str):
        value = parse_value(value, _hints(obj)[head], full)
    else:
        value = _coerce(value, _hints(obj)[head], full)
    return dataclasses.replace(obj, **{head: value})


def _coerce(value, kind, key):
    """Typed values (Tune samples, JSON) of the right kind; numbers convert where lossless."""
    if isinstance(value, bool) or kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if kind is float and isinstance(value, numbers.Real):
        return float(value)
    if kind is int and isinstance(value, numbers.Real) and float(value).is_integer():
        return int(value)
    if kind in (int, str) and not isinstance(value, kind):
        raise ConfigError(f"{key}: expected {kind.__name__}, got {value!r}")
    return value


def apply_overrides(obj, overrides):
    """Apply `key=value` strings (CLI) or a {key: value} dict (Tune) to a dataclass config."""
    items = overrides.items() if isinstance(overrides, dict) else [_split(o) for o in overrides]
    for key, value in items:
        obj = set_key(obj, key, value)
    return obj


def _split(text):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. optim.lr=1e-4)")
    return key.strip(), value.strip()


def to_dict(obj):
    return dataclasses.asdict(obj)


def flatten(obj, prefix: str = "") -> dict:
    """{dotted key: value} for every leaf of a (nested) dataclass or dict: MLflow params and Tune
    spaces use these names."""
    items = to_dict(obj) if dataclasses.is_dataclass(obj) else obj
    flat = {}
    for k, v in items.items():
        flat.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return flat


def from_dict(cls_or_obj, data):
    """Rebuild a config from `to_dict` output (or JSON), checking every key as overrides do."""
    obj = cls_or_obj() if isinstance(cls_or_obj, type) else cls_or_obj
    # JSON turned tuples into lists
    return apply_overrides(obj, {k: tuple(v) if isinstance(v, list) else v for k, v in flatten(data).items()})


# ----------------------------------------------------------------------------- allowed values
# A field declares what it allows beside itself: `field(default=..., metadata={"choices": (...)})`
# for a word, {"min": 1}, {"max": 1}, {"below": 1} (exclusive) or {"above": 0} (exclusive) for a
# number. A number (or each number of a tuple) must be finite, and >= 0 unless it declares its own
# lower bound: no field of a run takes a negative value, and NaN fails every comparison silently.


def checked(default, **rules):
    """A dataclass field with its allowed values (see above), e.g. `steps: int = checked(1000, min=1)`."""
    return dataclasses.field(default=default, metadata=rules)


def check_values(obj, prefix: str = "") -> None:
    """Raise ConfigError naming the first field of a (nested) dataclass outside its allowed values."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            check_values(value, f"{prefix}{f.name}.")
            continue
        allowed = _disallowed(value, f.metadata)
        if allowed:
            shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
            raise ConfigError(f"{prefix}{f.name}={shown} is not allowed: {allowed}")


def _disallowed(value, rules) -> str:
    """'' when `value` fits `rules`, else what is allowed."""
    if "choices" in rules:
        choices = rules["choices"]
        return "" if value in choices else "one of " + ", ".join(repr(c) for c in choices)
    values = [v for v in (value if isinstance(value, tuple) else (value,))
                if isinstance(v, numbers.Real) and not isinstance(v, bool)]
    bounds = _bounds(rules)
    for v in values:
        if not math.isfinite(v) or not all(ok(v) for ok, _ in bounds):
            return "a finite number " + " and ".join(text for _, text in bounds)
    return ""


_LIMITS = {"min": (">=", operator.ge), "above": (">", operator.gt),
           "max": ("<=", operator.le), "below": ("<", operator.lt)}


def _bounds(rules) -> list:
    """[(test, text)] of the declared limits; a lower bound of 0 unless one is declared."""
    given = {k: rules[k] for k in _LIMITS if k in rules}
    if "min" not in given and "above" not in given:
        given = {"min": 0, **given}
    return [(lambda v, op=_LIMITS[k][1], b=b: op(v, b), f"{_LIMITS[k][0]} {b:g}") for k, b in given.items()]
