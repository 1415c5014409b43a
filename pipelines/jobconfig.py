"""Job configuration: YAML files and command-line overrides parsed into frozen pydantic models.

Every job (``IngestJob``, ``TrainJob``, ``TuneJob``, ``InferJob``) is a :class:`JobModel`: a
frozen pydantic v2 model whose fields are plain values, nested models ("sections") or the plain
``ossnet.config`` dataclasses (:data:`Checked` runs their ``validate()``). Pydantic checks
types, bounds (``Field(ge=...)``), choices (``Literal[...]`` built from the tuples in
``ossnet.config`` and ``ossnet.inference``) and unknown keys; cross-field rules are
``model_validator(mode="after")`` methods that raise :class:`ConfigError` naming the field
relative to their model; a plain ``ValueError`` (from a field validator, or a model validator
about its whole model) carries the message only and is named by where it was raised.
Whatever fails, the job raises one line naming the field by its dotted
path, e.g. ``train.epochs: must be >= 1, got 0`` (:func:`describe_error`).

Overrides are ``key=value`` strings whose value is read as YAML (``train.epochs=3``,
``train.milestones=[20, 30]``, ``run.name=null``); the command-line flags that map onto them
live in ``ossnet_pipelines.jobrunner``. Typical use::

    job = load_job(TrainJob, "configs/brats2020.yaml", ["train.epochs=3", "scaling.num_workers=2"])
    trial = job.updated({"train.alpha": 0.3, "run.name": "trial-1"})   # validated again
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any, ClassVar, Iterable, Mapping, Sequence, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, ValidationError

from ossnet.config import ConfigError

M = TypeVar("M", bound="JobModel")


# --------------------------------------------------------------------------- models


class JobModel(BaseModel):
    """Base of every job and section: frozen, unknown keys refused, NaN/inf refused, and numbers
    accepted where text is expected (a YAML ``name: 2024`` is the string "2024").

    A job sets ``error_type`` (the exception its callers catch) and ``error_prefix`` (``"ingest."``
    for flat jobs whose fields are command-line flags): :meth:`parse` raises it with one line
    naming the first bad field. Jobs built from keywords derive from :class:`Job`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False, coerce_numbers_to_str=True,
                              revalidate_instances="always")
    error_type: ClassVar[type[Exception]] = ConfigError
    error_prefix: ClassVar[str] = ""

    @classmethod
    def parse(cls: type[M], data: Mapping[str, Any] | None) -> M:
        """The job a mapping describes (None: all defaults).

        Raises:
            ``error_type``: the first problem, naming the field by its dotted path.
        """
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise cls.error_type(f"expected a mapping of sections, got {type(data).__name__}")
        try:
            return cls.model_validate(dict(data))
        except ValidationError as exc:
            raise cls.error_type(describe_error(exc, cls, cls.error_prefix)) from None

    def updated(self: M, changes: Mapping[str, Any]) -> M:
        """A copy with each dotted key of ``changes`` set (``{"train.alpha": 0.3}``), validated
        again as a whole, so cross-field rules see the new values.

        Raises:
            ``error_type``: an unknown key or an invalid result, naming the field.
        """
        root: Any = self
        for key, value in changes.items():
            root = _set_path(root, key.split("."), value, key)
        return type(self).parse(dict(root))

    def to_dict(self) -> dict[str, Any]:
        """Nested plain form (sections -> dicts, tuples -> lists), for YAML, JSON and MLflow."""
        return self.model_dump(mode="json")


class Job(JobModel):
    """A top-level job: constructing it from keywords (``IngestJob(source=..., store=...)``)
    raises ``error_type`` with one line, like :meth:`parse`. Sections stay plain
    :class:`JobModel`: pydantic calls a custom ``__init__`` for nested models too, and their
    errors must reach the job whole to be named by their full path."""

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise type(self).error_type(describe_error(exc, type(self), type(self).error_prefix)) from None


def _set_path(node: Any, parts: list[str], value: Any, key: str) -> Any:
    name, rest = parts[0], parts[1:]
    if isinstance(node, BaseModel):
        names = type(node).model_fields
    elif dataclasses.is_dataclass(node) and not isinstance(node, type):
        names = {f.name: f for f in dataclasses.fields(node)}
    elif isinstance(node, Mapping) and rest == []:
        return {**node, name: value}
    else:
        names = {}
    if name not in names:
        raise ConfigError(f"{key}: unknown field")
    new = _set_path(getattr(node, name), rest, value, key) if rest else value
    if isinstance(node, BaseModel):
        return node.model_copy(update={name: new})
    return dataclasses.replace(node, **{name: new})


def _text(value: Any) -> Any:
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text


#: A required text field (a path, URL or name): ``os.PathLike`` accepted, blank refused.
NonBlank = Annotated[str, BeforeValidator(_text), AfterValidator(_not_blank)]


def safe_name(max_length: int) -> Any:
    """The type of a name used in paths and run keys: 1 to ``max_length`` letters, digits, '.',
    '_' or '-', starting with a letter or digit."""
    pattern = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9._-]{{0,{max_length - 1}}}$")

    def check(name: str) -> str:
        if not pattern.match(name):
            raise ValueError(f"{name!r} must be 1-{max_length} letters, digits, '.', '_' or '-'")
        return name

    return Annotated[str, AfterValidator(check)]


def _checked(config: Any) -> Any:
    config.validate()
    return config


T = TypeVar("T")
#: An ``ossnet.config`` dataclass (``SamplingConfig``, ``AugmentConfig``) as a job section:
#: pydantic checks its field types, then its own ``validate()`` runs.
Checked = Annotated[T, AfterValidator(_checked)]


# --------------------------------------------------------------------------- error messages


def _loc_text(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _field_names(cls: Any, loc: Sequence[int | str]) -> list[str]:
    """Field names of the model or dataclass found by following ``loc`` from ``cls``."""
    for part in loc:
        if isinstance(part, int):
            cls = next(iter(typing.get_args(cls)), None)
            continue
        if isinstance(cls, type) and issubclass(cls, BaseModel):
            info = cls.model_fields.get(part)
            cls = info.annotation if info is not None else None
        elif dataclasses.is_dataclass(cls):
            cls = typing.get_type_hints(cls).get(part)
        else:
            return []
        while typing.get_origin(cls) is not None and typing.get_origin(cls) is not tuple:
            cls = next((a for a in typing.get_args(cls) if a is not type(None)), None)
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        return list(cls.model_fields)
    if dataclasses.is_dataclass(cls):
        return [f.name for f in dataclasses.fields(cls)]
    return []


_BOUNDS = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"),
           "less_than_equal": ("<=", "le"), "less_than": ("<", "lt")}
_EXPECTED = {
    "int": "an integer", "float": "a number", "bool": "true or false", "string": "a string",
    "tuple": "a list", "list": "a list", "dict": "a mapping", "model": "a mapping", "dataclass": "a mapping",
}


def _message(error: Mapping[str, Any], root: Any) -> tuple[str, str]:
    """``(path, message)`` of one pydantic error."""
    kind, loc, value, ctx = error["type"], tuple(error["loc"]), error.get("input"), error.get("ctx") or {}
    path = _loc_text(loc)
    if kind in ("value_error", "assertion_error") and isinstance(ctx.get("error"), ConfigError):
        # A model validator's ConfigError names its field from that model ("milestones: ..."),
        # or from the job's top (ossnet.config's own "sampling.n_points: ...").
        text = str(ctx["error"])
        if not path or text.startswith((path + ".", path + ":", path + "[")):
            return "", text
        return "", f"{path}.{text}"
    if kind == "value_error" and "error" in ctx:  # a field validator's ValueError: the message only
        return path, str(ctx["error"])
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        names = _field_names(root, loc[:-1])
        return path, "unknown field" + (f"; expected one of: {', '.join(names)}" if names else "")
    if kind in ("missing", "missing_argument"):
        if loc and isinstance(loc[-1], int):
            return _loc_text(loc[:-1]), f"too few items: item [{loc[-1]}] is missing"
        return path, "required field is missing"
    if kind == "too_long":
        return path, f"expected a list of at most {ctx.get('max_length')} items, got {ctx.get('actual_length')}"
    if kind in _BOUNDS:
        sign, key = _BOUNDS[kind]
        return path, f"must be {sign} {ctx.get(key)}, got {value!r}"
    if kind == "literal_error":
        return path, f"must be one of {ctx.get('expected')}, got {value!r}"
    if kind == "finite_number":
        return path, f"must be finite, got {value!r}"
    if kind == "int_from_float":
        return path, f"expected an integer, got {value!r}"
    head = kind.split("_")[0]
    if head in _EXPECTED and kind.endswith(("_type", "_parsing")):
        return path, f"expected {_EXPECTED[head]}, got {value!r}"
    return path, str(error.get("msg", kind))


def describe_error(exc: ValidationError, root: Any = None, prefix: str = "") -> str:
    """One line for the first error of a pydantic ``ValidationError``: ``dotted.path: message``."""
    path, text = _message(exc.errors(include_url=False)[0], root)
    if path:
        return f"{prefix}{path}: {text}"
    return text if text.startswith(prefix) else f"{prefix}{text}"


# --------------------------------------------------------------------------- dumps, hashes


def dump_yaml(job: JobModel) -> str:
    """A job as YAML text, in field order."""
    return yaml.safe_dump(job.to_dict(), sort_keys=False, default_flow_style=None)


def config_hash(job: JobModel | Mapping[str, Any], exclude: Iterable[str] = (), length: int = 8) -> str:
    """A short stable hash of a job (or its plain form), leaving out the dotted keys (or
    sections) in ``exclude``."""
    data = job.to_dict() if isinstance(job, JobModel) else copy.deepcopy(dict(job))
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
    cls: type[M],
    path: str | Path | None = None,
    overrides: Iterable[str | tuple[str, Any]] = (),
    *,
    base: Mapping[str, Any] | None = None,
) -> M:
    """Parse a job: ``base`` (a mapping), then the YAML file at ``path``, then ``overrides``.

    Raises:
        ConfigError: unreadable file, bad override, or an invalid field (named).
    """
    data: dict[str, Any] = copy.deepcopy(dict(base or {}))
    if path is not None:
        data = _merge(data, load_yaml(path))
    data = apply_overrides(data, overrides)
    return cls.parse(data)


def _merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


__all__ = [
    "Checked",
    "ConfigError",
    "Job",
    "JobModel",
    "NonBlank",
    "apply_overrides",
    "config_hash",
    "describe_error",
    "dump_yaml",
    "load_job",
    "load_yaml",
    "parse_override",
    "safe_name",
]
