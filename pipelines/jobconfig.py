"""Job configuration: YAML files and command-line overrides parsed into frozen dataclasses.

Generic over the job class (``TrainJob``, ``TuneJob``, ``InferJob``...): a job is a frozen
dataclass whose fields are plain values or nested frozen dataclasses ("sections"). Parsing
checks everything once, before any work starts, and every error names the offending field by
its dotted path, e.g. ``train.epochs: must be >= 1, got 0``:

- unknown keys, missing required fields and wrongly typed values (by the field annotations:
  ``int``, ``float``, ``bool``, ``str``, ``X | None``, ``Literal[...]``, ``tuple[int, ...]``,
  ``tuple[int, int, int]``, ``dict[str, float]``, nested dataclasses);
- bounds and choices declared on the field (:func:`constrained`);
- cross-field rules in the class's own ``validate()`` method (called after construction).

Overrides are ``key=value`` strings whose value is read as YAML (``train.epochs=3``,
``train.milestones=[20, 30]``, ``run.name=null``); dedicated flags such as ``--epochs`` map onto
the same keys (:class:`OverrideFlag`). Typical use::

    job = load_job(TrainJob, "configs/brats2020.yaml", ["train.epochs=3", "scaling.num_workers=2"])
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence, TypeVar, Union

import yaml

from ossnet.config import ConfigError

T = TypeVar("T")

_MISSING = dataclasses.MISSING


class _NoConst:
    """Marks an :class:`OverrideFlag` that takes a value (not a ``store_const`` flag)."""

    def __repr__(self) -> str:
        return "NO_CONST"


NO_CONST = _NoConst()


def constrained(
    default: Any = _MISSING,
    *,
    default_factory: Any = _MISSING,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: Sequence[Any] | None = None,
    item_ge: float | None = None,
    help: str = "",
) -> Any:
    """A dataclass field with bounds/choices that :func:`parse_section` checks (None is exempt).

    Args:
        default / default_factory: as for ``dataclasses.field``.
        ge, gt, le, lt: numeric bounds on the value.
        choices: allowed values.
        item_ge: lower bound on every item of a tuple value.
        help: one-line description (used by generated docs and ``--help``).
    """
    meta = {k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt, choices=choices, item_ge=item_ge).items() if v is not None}
    meta["help"] = help
    if default_factory is not _MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------- type coercion


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        return "a list"
    if origin in (dict, Mapping) or tp is dict:
        return "a mapping"
    if is_dataclass(tp):
        return "a mapping"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _fail(path: str, message: str) -> ConfigError:
    return ConfigError(f"{path}: {message}" if path else message)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    """``value`` converted to annotation ``tp``; ConfigError naming ``path`` when impossible."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if is_dataclass(tp) and isinstance(tp, type):
        return parse_section(tp, value, path)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise _fail(path, f"must not be null (expected {_type_name(tp)})")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, path)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise _fail(path, f"expected {_type_name(tp)}, got {value!r}")
    if value is None:
        raise _fail(path, f"must not be null (expected {_type_name(tp)})")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise _fail(path, f"must be {_type_name(tp)}, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise _fail(path, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not value.is_integer()
        ):
            raise _fail(path, f"expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise _fail(path, f"expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(path, f"expected a number, got {value!r}")
        if not math.isfinite(float(value)):
            raise _fail(path, f"must be finite, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise _fail(path, f"expected a string, got {value!r}")
        return str(value)
    if origin in (tuple, list):
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (list, tuple)):
            raise _fail(path, f"expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise _fail(path, f"expected a list of {len(args)} items, got {len(value)}")
            return tuple(_coerce(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise _fail(path, f"expected a mapping, got {value!r}")
        key_tp, val_tp = typing.get_args(tp) or (Any, Any)
        return {_coerce(key_tp, k, path): _coerce(val_tp, v, f"{path}.{k}") for k, v in value.items()}
    if isinstance(tp, type):
        if not isinstance(value, tp):
            raise _fail(path, f"expected {_type_name(tp)}, got {value!r}")
        return value
    raise TypeError(f"{path}: unsupported annotation {tp!r}")


def _check_constraints(meta: Mapping[str, Any], value: Any, path: str) -> None:
    if value is None:
        return
    if "choices" in meta and value not in meta["choices"]:
        raise _fail(path, f"must be one of {', '.join(map(str, meta['choices']))}, got {value!r}")
    bounds = (("ge", ">=", lambda v, b: v >= b), ("gt", ">", lambda v, b: v > b),
              ("le", "<=", lambda v, b: v <= b), ("lt", "<", lambda v, b: v < b))
    for key, sign, ok in bounds:
        if key in meta and not ok(value, meta[key]):
            raise _fail(path, f"must be {sign} {meta[key]}, got {value!r}")
    if "item_ge" in meta and any(v < meta["item_ge"] for v in value):
        raise _fail(path, f"every item must be >= {meta['item_ge']}, got {list(value)}")


def _prefix_error(exc: ConfigError, path: str) -> ConfigError:
    """Make a ``validate()`` message (which names the field relative to its own section) absolute."""
    message = str(exc)
    parent = path.rpartition(".")[0]
    if path and not message.startswith(path) and parent:
        return ConfigError(f"{parent}.{message}")
    return exc


def parse_section(cls: type[T], data: Mapping[str, Any] | None, path: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, checking keys, types, constraints and ``validate()``.

    Args:
        cls: a dataclass (nested dataclass fields are parsed recursively).
        data: the mapping (None means all defaults).
        path: dotted path of this section, used in error messages ("" for the top level).

    Raises:
        ConfigError: the first problem found, naming the field by its dotted path.
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise _fail(path, f"expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = [k for k in data if k not in known]
    if unknown:
        where = f"{path}.{unknown[0]}" if path else str(unknown[0])
        raise _fail(where, f"unknown field; expected one of: {', '.join(known)}")
    kwargs: dict[str, Any] = {}
    for name, f in known.items():
        sub = f"{path}.{name}" if path else name
        if name in data:
            value = _coerce(hints[name], data[name], sub)
        elif is_dataclass(hints[name]) and f.default is _MISSING and f.default_factory is _MISSING:
            value = parse_section(hints[name], None, sub)
        elif f.default is _MISSING and f.default_factory is _MISSING:
            raise _fail(sub, "required field is missing")
        else:
            continue
        _check_constraints(f.metadata, value, sub)
        kwargs[name] = value
    try:
        obj = cls(**kwargs)
    except ConfigError as exc:
        raise _prefix_error(exc, path) from None
    except (TypeError, ValueError) as exc:
        raise _fail(path, str(exc)) from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError as exc:
            raise _prefix_error(exc, path) from None
    return obj


def to_dict(obj: Any) -> Any:
    """Nested plain form of a config (dataclasses -> dicts, tuples -> lists), for YAML/JSON."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def dump_yaml(obj: Any) -> str:
    """A config as YAML text, in field order."""
    return yaml.safe_dump(to_dict(obj), sort_keys=False, default_flow_style=None)


def config_hash(obj: Any, exclude: Iterable[str] = (), length: int = 8) -> str:
    """A short stable hash of a config, leaving out the dotted keys (or sections) in ``exclude``."""
    data = to_dict(obj)
    for key in exclude:
        node = data
        *parents, last = key.split(".")
        for part in parents:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(last, None)
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


# --------------------------------------------------------------------------- files, overrides


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML file; ConfigError naming the file otherwise."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read the config file ({exc.strerror or exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{p}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=value"`` -> ``("a.b", value)`` with the value read as YAML (``3``, ``[1, 2]``, ``null``)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE with a dotted key, e.g. train.epochs=3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not YAML: keep the text (e.g. a URL with a colon)
    return key, value


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str | tuple[str, Any]]) -> dict[str, Any]:
    """A deep copy of ``data`` with each ``key=value`` (or ``(key, value)``) set at its dotted key."""
    out = copy.deepcopy(dict(data))
    for item in overrides:
        key, value = parse_override(item) if isinstance(item, str) else item
        node = out
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(parts[: i + 1])}: is a value, so {key} cannot be set")
            node = child
        node[parts[-1]] = value
    return out


def load_job(
    cls: type[T],
    path: str | Path | None = None,
    overrides: Iterable[str | tuple[str, Any]] = (),
    *,
    base: Mapping[str, Any] | None = None,
) -> T:
    """Parse a job: ``base`` (a mapping), then the YAML file at ``path``, then ``overrides``.

    Raises:
        ConfigError: unreadable file, bad override, or an invalid field (named).
    """
    data: dict[str, Any] = copy.deepcopy(dict(base or {}))
    if path is not None:
        data = _merge(data, load_yaml(path))
    data = apply_overrides(data, overrides)
    return parse_section(cls, data)


def _merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


# --------------------------------------------------------------------------- command line


@dataclass(frozen=True)
class OverrideFlag:
    """A dedicated command-line flag that sets one config key (sugar for ``--set key=value``).

    Attributes:
        flag: e.g. ``"--epochs"``.
        key: dotted config key, e.g. ``"train.epochs"``.
        type: argparse type (``int``, ``float``, ``str``) or ``bool`` for a
            ``--flag/--no-flag`` pair.
        help: help text.
        const: for ``store_const`` flags (e.g. ``--no-mlflow`` sets ``tracking.enabled=False``).
    """

    flag: str
    key: str
    type: Any = str
    help: str = ""
    const: Any = NO_CONST

    @property
    def dest(self) -> str:
        return "override_" + self.key.replace(".", "__")


def add_config_arguments(parser: argparse.ArgumentParser, flags: Sequence[OverrideFlag] = (), *,
                         config_required: bool = False) -> None:
    """Add ``--config``, repeatable ``--set KEY=VALUE`` and the dedicated override ``flags``."""
    parser.add_argument("--config", "-c", metavar="YAML", required=config_required, help="job config file")
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                        help="override a config key (repeatable), e.g. --set train.lr=1e-3")
    for f in flags:
        if f.const is not NO_CONST:
            parser.add_argument(f.flag, dest=f.dest, action="store_const", const=f.const, default=None, help=f.help)
        elif f.type is bool:
            parser.add_argument(f.flag, dest=f.dest, action=argparse.BooleanOptionalAction, default=None, help=f.help)
        else:
            metavar = f.key.rsplit(".", 1)[-1].upper()
            parser.add_argument(f.flag, dest=f.dest, type=f.type, default=None, metavar=metavar, help=f.help)


def overrides_from_args(args: argparse.Namespace, flags: Sequence[OverrideFlag] = ()) -> list[tuple[str, Any]]:
    """The overrides of a parsed command line: ``--set`` items first, then the dedicated flags."""
    out: list[tuple[str, Any]] = [parse_override(s) for s in getattr(args, "overrides", None) or []]
    for f in flags:
        value = getattr(args, f.dest, None)
        if value is not None:
            out.append((f.key, value))
    return out


#: The MLflow flags shared by ``ossnet train`` and ``ossnet tune`` (both take a training job).
TRACKING_FLAGS: tuple[OverrideFlag, ...] = (
    OverrideFlag("--tracking-uri", "tracking.uri", str,
                 "MLflow tracking URI (default $MLFLOW_TRACKING_URI, else .ossnet/mlflow.db)"),
    OverrideFlag("--experiment", "tracking.experiment", str, "MLflow experiment"),
    OverrideFlag("--model-name", "tracking.model_name", str, "registered model name"),
)


def add_submission_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """``--config-json`` (the whole ``what`` as JSON, how ``--address`` submits it), ``--address``
    and ``--dry-run``."""
    parser.add_argument("--config-json", metavar="JSON", help=f"the whole {what} as JSON (what --address submits)")
    parser.add_argument("--address", metavar="URL",
                        help="submit to this Ray cluster's Jobs API (e.g. http://127.0.0.1:8275) instead of running here")
    parser.add_argument("--dry-run", action="store_true", help=f"validate and print the resolved {what}, then exit")


def config_from_args(args: argparse.Namespace, flags: Sequence[OverrideFlag] = ()) -> dict[str, Any]:
    """The job mapping of a parsed command line: ``--config`` YAML or ``--config-json``, with the
    ``--set`` items and the dedicated ``flags`` applied.

    Raises:
        ConfigError: both sources given, or JSON that does not parse.
    """
    config_json = getattr(args, "config_json", None)
    if config_json and args.config:
        raise ConfigError("--config and --config-json are mutually exclusive")
    data = load_yaml(args.config) if args.config else {}
    if config_json:
        try:
            data = json.loads(config_json)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--config-json: not valid JSON ({exc})") from None
    return apply_overrides(data, overrides_from_args(args, flags))


__all__ = [
    "TRACKING_FLAGS",
    "add_submission_arguments",
    "config_from_args",
    "ConfigError",
    "OverrideFlag",
    "add_config_arguments",
    "apply_overrides",
    "config_hash",
    "constrained",
    "dump_yaml",
    "load_job",
    "load_yaml",
    "overrides_from_args",
    "parse_override",
    "parse_section",
    "to_dict",
]
