"""Model registry: register + promote the ``champion`` alias, and resolve model specs to files.

Aliases, not stages: ``register_and_promote`` adds a version tagged with its promotion score and
settles the alias on the best-scoring version (a rule over the registered versions, re-checked
after every write, so concurrent promoters converge on the same winner). ``locate_model`` checks
that a model spec exists (registry lookups only, no download) so jobs fail before any work;
``resolve_model_uri`` then downloads the bundle into a cache and returns the checkpoint file.

Accepted specs: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``models:/<model_id>``,
``runs:/<run_id>/<model name>``, a bare 32-hex MLflow run id, or a local path (a checkpoint
file, or a downloaded bundle directory).
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

from ossnet_pipelines.tracking.uri import (
    TrackingConfigError,
    check_reachable,
    resolve_tracking_uri,
    sqlite_path,
    state_dir,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient

logger = logging.getLogger(__name__)

CHAMPION_ALIAS = "champion"
DEFAULT_MODEL_NAME = "ossnet"
DEFAULT_MODEL_SPEC = f"models:/{DEFAULT_MODEL_NAME}@{CHAMPION_ALIAS}"
_RUN_ID_RE = re.compile(r"^[0-9a-f]{32}$")
_NOT_FOUND = {"RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"}


class ModelNotFoundError(LookupError):
    """A model spec names a model, alias, version, run or file that does not exist."""


@dataclass(frozen=True)
class ModelLocation:
    """Where a model spec points, checked to exist.

    Attributes:
        spec: the spec as given.
        kind: "registry", "logged_model", "run" or "local".
        uri: the MLflow URI to download (None for local paths).
        local_path: the local checkpoint file or bundle directory (kind "local").
        name, version: registered model name and version (kind "registry").
        model_id: the MLflow logged model id, when known.
        run_id: the source run, when known.
    """

    spec: str
    kind: str
    uri: str | None = None
    local_path: Path | None = None
    name: str | None = None
    version: int | None = None
    model_id: str | None = None
    run_id: str | None = None

    @property
    def cache_key(self) -> str | None:
        """A directory name that identifies immutable content, or None (don't cache)."""
        if self.model_id:
            return self.model_id
        return None


def _client(tracking_uri: str | None) -> "MlflowClient":
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _not_found(exc: Exception) -> bool:
    return getattr(exc, "error_code", None) in _NOT_FOUND


def _model_id_of_version(mv: Any) -> str | None:
    model_id = getattr(mv, "model_id", None)
    if model_id:
        return model_id
    source = getattr(mv, "source", "") or ""
    match = re.match(r"^models:/(m-[0-9a-f]+)$", source)
    return match.group(1) if match else None


def _lookup(fetch: Callable[[], Any], missing: str) -> Any:
    """``fetch()``, with MLflow's not-found errors turned into ``ModelNotFoundError(missing)``."""
    from mlflow.exceptions import MlflowException

    try:
        return fetch()
    except MlflowException as exc:
        if _not_found(exc):
            raise ModelNotFoundError(missing) from exc
        raise


def _run_model(client: "MlflowClient", run_id: str, name: str | None) -> Any:
    """The logged model of a run named ``name`` (latest step), else its only/latest model."""
    run = _lookup(lambda: client.get_run(run_id), f"model: no MLflow run {run_id} in {client.tracking_uri}")
    outputs = list(run.outputs.model_outputs) if run.outputs is not None else []
    steps = {o.model_id: o.step for o in outputs}
    models = [client.get_logged_model(mid) for mid in steps]
    if not models:  # older servers may not record run outputs: search the experiment
        models = [m for m in client.search_logged_models([run.info.experiment_id]) if m.source_run_id == run_id]
    if name is not None:
        models = [m for m in models if m.name == name]
    if not models:
        what = f"named {name!r}" if name else "logged"
        raise ModelNotFoundError(f"model: run {run_id} has no model {what}")
    return max(models, key=lambda m: (steps.get(m.model_id, 0), m.creation_timestamp))


def locate_model(spec: str, tracking_uri: str | None = None) -> ModelLocation:
    """Check that ``spec`` names an existing model and say where it is; downloads nothing.

    Raises:
        ModelNotFoundError: with a one-line message naming the missing name/alias/version/run.
        ValueError: an unsupported spec (e.g. a registry stage instead of an alias).
    """
    spec = str(spec).strip()
    if not spec:
        raise ValueError("model: empty model spec")
    local = Path(spec).expanduser()
    if "://" not in spec and not spec.startswith(("models:", "runs:")):
        if local.exists():
            return ModelLocation(spec, "local", local_path=local.resolve())
        if not _RUN_ID_RE.match(spec):
            raise ModelNotFoundError(f"model: {spec!r} is not a file, a models:/ or runs:/ URI, or an MLflow run id")
    uri = resolve_tracking_uri(tracking_uri)
    try:
        check_reachable(uri)
    except TrackingConfigError as exc:
        raise ModelNotFoundError(f"model: {spec!r}: {exc}") from None
    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        # Opening it would create an empty database (and run MLflow's migrations) first.
        raise ModelNotFoundError(f"model: {spec!r} not found: there is no MLflow database at {db}")
    client = _client(uri)
    where = client.tracking_uri
    if _RUN_ID_RE.match(spec):
        lm = _run_model(client, spec, None)
        return ModelLocation(spec, "run", uri=f"models:/{lm.model_id}", model_id=lm.model_id, run_id=spec)
    if spec.startswith("runs:/"):
        parts = spec[len("runs:/"):].strip("/").split("/", 1)
        name = parts[1] if len(parts) > 1 and parts[1] else None
        lm = _run_model(client, parts[0], name)
        return ModelLocation(spec, "run", uri=f"models:/{lm.model_id}", model_id=lm.model_id, run_id=parts[0])
    if not spec.startswith("models:/"):
        raise ValueError(f"model: unsupported URI {spec!r}; use models:/NAME@ALIAS, models:/NAME/VERSION or a run id")
    body = spec[len("models:/"):].strip("/")
    if re.match(r"^m-[0-9a-f]+$", body):
        lm = _lookup(lambda: client.get_logged_model(body), f"model: no logged model {body} in {where}")
        return ModelLocation(spec, "logged_model", uri=spec, model_id=body, run_id=lm.source_run_id)
    if "@" in body:
        name, alias = body.rsplit("@", 1)
        version = None
    elif "/" in body:
        name, version = body.rsplit("/", 1)
        alias = None
        if not version.isdigit():
            raise ValueError(f"model: {spec!r}: registry stages are not supported; use models:/{name}@ALIAS")
    else:
        raise ValueError(f"model: {spec!r} needs an alias or a version: models:/{body}@champion or models:/{body}/1")
    rm = _lookup(lambda: client.get_registered_model(name), f"model: no registered model {name!r} in {where}")
    if alias is not None:
        if alias not in rm.aliases:
            known = ", ".join(sorted(rm.aliases)) or "none"
            raise ModelNotFoundError(f"model: registered model {name!r} has no alias {alias!r} (aliases: {known})")
        version = str(rm.aliases[alias])
    mv = _lookup(lambda: client.get_model_version(name, str(version)),
                 f"model: registered model {name!r} has no version {version}")
    model_id = _model_id_of_version(mv)
    return ModelLocation(spec, "registry", uri=f"models:/{name}/{mv.version}", name=name, version=int(mv.version),
                         model_id=model_id, run_id=mv.run_id or None)


def resolve_model_uri(
    spec: str, tracking_uri: str | None = None, *, dst_dir: str | os.PathLike[str] | None = None
) -> Path:
    """A local checkpoint file for a model spec, downloading the bundle when needed.

    Existence is checked first (``locate_model``), so a wrong name/alias/version/run fails
    before any download. Bundles of logged models are immutable and cached by model id under
    ``dst_dir`` (default ``<state dir>/models``); a cache entry is complete or absent.

    Raises:
        ModelNotFoundError: the model, alias, version, run or file does not exist.
    """
    from ossnet_pipelines.tracking.bundle import checkpoint_in_model_dir

    loc = locate_model(spec, tracking_uri)
    if loc.kind == "local":
        assert loc.local_path is not None
        return checkpoint_in_model_dir(loc.local_path) if loc.local_path.is_dir() else loc.local_path
    cache_root = Path(dst_dir) if dst_dir is not None else state_dir() / "models"
    cache_root.mkdir(parents=True, exist_ok=True)
    key = loc.cache_key
    if key is not None and (cache_root / key / "MLmodel").is_file():
        logger.debug("model %s: cached at %s", spec, cache_root / key)
        return checkpoint_in_model_dir(cache_root / key)
    return checkpoint_in_model_dir(_download(loc, cache_root, tracking_uri))


def _artifact_location(loc: ModelLocation, client: "MlflowClient") -> str:
    """The artifact-store URI behind a located model.

    MLflow resolves ``models:/`` URIs with the process-wide registry URI whatever URI is
    passed, so the lookup goes through our own client instead and only the storage URI is
    handed to the download.
    """
    assert loc.uri is not None
    if loc.kind == "registry" and loc.name is not None and loc.version is not None:
        return client.get_model_version_download_uri(loc.name, str(loc.version))
    if loc.model_id:
        return client.get_logged_model(loc.model_id).artifact_location
    return loc.uri


def _download(loc: ModelLocation, cache_root: Path, tracking_uri: str | None) -> Path:
    import mlflow.artifacts

    uri = resolve_tracking_uri(tracking_uri)
    source = _artifact_location(loc, _client(uri))
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=cache_root))
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(staging),
                                                         tracking_uri=uri))
        if loc.cache_key is None:
            return local
        final = cache_root / loc.cache_key
        try:
            os.replace(local, final)
        except OSError:
            if not (final / "MLmodel").is_file():  # another process filled it meanwhile: use theirs
                raise
        logger.debug("model %s downloaded to %s", loc.spec, final)
        return final
    finally:
        if loc.cache_key is not None:
            shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def _process_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's process-wide tracking URI at ``uri`` for the duration, then restore it.

    A SQL store resolves a new version's ``models:/<model_id>`` source with a fresh default
    client (the process-wide URI), not with the client that registers it.
    """
    import mlflow

    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


@dataclass(frozen=True)
class Promotion:
    """What :func:`register_and_promote` did.

    Attributes:
        version: the new version.
        promoted: whether ``alias`` points to the new version when the call returns.
        champion: the version holding ``alias`` when the call returns (None: unset).
        message: one line: the rule and the outcome, for the console and the version's tags.
    """

    version: int
    promoted: bool
    champion: int | None
    message: str


def _finite(raw: Any) -> float | None:
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _version_scores(client: "MlflowClient", name: str, score_key: str) -> dict[int, float]:
    """Version -> its finite ``score_key`` tag, for every version of ``name`` that has one."""
    versions = client.search_model_versions(f"name = '{name}'", max_results=10000)
    scores = {int(mv.version): _finite(mv.tags.get(score_key)) for mv in versions}
    return {v: s for v, s in scores.items() if s is not None}


def settle_alias(
    client: "MlflowClient",
    name: str,
    score_key: str,
    *,
    alias: str = CHAMPION_ALIAS,
    rescore: Callable[[int], float | None] | None = None,
    max_rounds: int = 20,
) -> tuple[int | None, str]:
    """Point ``alias`` at the best-scoring version of ``name`` by its ``score_key`` tag.

    The rule is a function of the registered versions only (highest score wins, the older
    version on ties), so concurrent promoters agree whatever their order. MLflow has no
    compare-and-set on an alias: each promoter sets it, then reads the versions and the alias
    again and sets it again until what it reads agrees with the rule. A promoter that set the
    alias from a stale read therefore corrects itself; one that reads after every version is
    registered only ever writes the winner. Two writes of the alias at the same instant can
    collide in the registry's database; the loser of that collision reads again.

    A current holder without a score under ``score_key`` (scored on other cases, or before
    scores existed) is scored by ``rescore(version)`` and tagged; when it cannot be scored
    (``rescore`` missing or returning None) the alias stays where it is.

    Returns:
        ``(holder, reason)``: the version holding the alias afterwards (None: unset), and why
        it did not move when it could not be decided ("" otherwise).
    """
    from mlflow.exceptions import MlflowException

    rescored: set[int] = set()
    for _ in range(max_rounds):
        raw = client.get_registered_model(name).aliases.get(alias)
        holder = int(raw) if raw is not None else None
        scores = _version_scores(client, name, score_key)
        if holder is not None and holder not in scores:
            value = rescore(holder) if rescore is not None and holder not in rescored else None
            rescored.add(holder)
            if value is None or not math.isfinite(value):
                return holder, (f"the current {alias!r} v{holder} has no score under {score_key!r} and could not "
                                "be scored on the same cases")
            client.set_model_version_tag(name, str(holder), score_key, repr(float(value)))
            continue
        if not scores:
            return holder, f"no version has a score under {score_key!r}"
        winner = max(scores, key=lambda v: (scores[v], -v))
        if holder == winner:
            return holder, ""
        try:
            client.set_registered_model_alias(name, alias, str(winner))
        except MlflowException as exc:  # another promoter wrote the alias at the same moment: read again
            logger.debug("model %s: setting %r collided with another promoter (%s)", name, alias, exc)
            time.sleep(random.uniform(0.05, 0.3))
            continue
        logger.info("model %s: %r -> v%d (%s %.4f; was %s)", name, alias, winner, score_key, scores[winner],
                    f"v{holder}" if holder is not None else "unset")
    raise RuntimeError(f"model {name}: alias {alias!r} did not settle after {max_rounds} rounds")


def register_and_promote(
    model_uri: str,
    name: str,
    score: float | None,
    score_key: str,
    *,
    alias: str = CHAMPION_ALIAS,
    tracking_uri: str | None = None,
    tags: Mapping[str, Any] | None = None,
    rescore: Callable[[int], float | None] | None = None,
    rule: str = "",
) -> Promotion:
    """Register ``model_uri`` as a new version of ``name`` and settle ``alias`` (:func:`settle_alias`).

    The version is tagged ``{score_key: score}`` plus ``tags``; higher scores are better. A
    ``None`` or NaN score registers the version without ever giving it the alias (and leaves
    the alias alone). Safe to run from several processes at once.

    Args:
        model_uri: ``models:/<model_id>`` (``ModelInfo.model_uri``) or ``runs:/<run_id>/<name>``.
        name: registered model name (created when missing).
        score: the promotion score (e.g. the test Dice on cases no selection saw), or None.
        score_key: the version tag holding it; only versions scored under the same key compete.
        alias: the alias to settle.
        tracking_uri: tracking/registry URI; default the resolved one.
        tags: extra version tags.
        rescore: scores an earlier version under ``score_key`` when the holder has no score.
        rule: the promotion rule in words, kept in the message.

    Returns:
        A :class:`Promotion`.
    """
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    loc = locate_model(model_uri, tracking_uri)
    if loc.kind not in ("logged_model", "run") or loc.model_id is None:
        raise ValueError(f"register_and_promote: {model_uri!r} is not a logged model (models:/<model_id> or runs:/)")
    try:
        client.create_registered_model(name)
        logger.info("created registered model %r", name)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    value = _finite(score)
    version_tags = {str(k): str(v) for k, v in (tags or {}).items()}
    if value is not None:
        version_tags[score_key] = repr(value)
    with _process_tracking_uri(client.tracking_uri):
        mv = client.create_model_version(name, source=f"models:/{loc.model_id}", run_id=loc.run_id,
                                         tags=version_tags, model_id=loc.model_id)
    version = int(mv.version)
    prefix = f"{rule}: " if rule else ""
    if value is None:
        raw = client.get_registered_model(name).aliases.get(alias)
        holder = int(raw) if raw is not None else None
        message = (f"{prefix}model {name} v{version} registered without a promotion score; "
                   f"{alias!r} stays {'v' + str(holder) if holder is not None else 'unset'}")
    else:
        holder, reason = settle_alias(client, name, score_key, alias=alias, rescore=rescore)
        scores = _version_scores(client, name, score_key)
        if holder == version:
            message = f"{prefix}model {name} v{version} ({value:.4f}) is now {alias!r}"
        elif reason:
            message = f"{prefix}model {name} v{version} ({value:.4f}) registered; {alias!r} stays v{holder}: {reason}"
        else:
            best = f" ({scores[holder]:.4f})" if holder in scores else ""
            message = f"{prefix}model {name} v{version} ({value:.4f}) registered; {alias!r} stays v{holder}{best}"
    promoted = holder == version
    logger.info("%s", message)
    return Promotion(version, promoted, holder, message)


def load_checkpoint_from_mlflow(
    model_uri: str,
    tracking_uri: str | None = None,
    *,
    map_location: str = "cpu",
    dst_dir: str | os.PathLike[str] | None = None,
) -> tuple[Any, Any]:
    """Load a bundle's model with the library's loader: ``(OSSNet, checkpoint info)``.

    Args:
        model_uri: anything ``resolve_model_uri`` accepts (``models:/NAME@ALIAS``,
            ``models:/NAME/VERSION``, ``models:/<model_id>``, ``runs:/<run_id>/<name>``, a run
            id, a local checkpoint or bundle directory).
        tracking_uri: tracking URI; default the resolved one.
        map_location: torch device for the weights.
        dst_dir: download cache directory (see ``resolve_model_uri``).

    Raises:
        ModelNotFoundError: the model, alias, version or run does not exist.
    """
    from ossnet.checkpoint import load_checkpoint

    path = resolve_model_uri(model_uri, tracking_uri, dst_dir=dst_dir)
    return load_checkpoint(str(path), map_location=map_location)


__all__ = [
    "CHAMPION_ALIAS",
    "DEFAULT_MODEL_NAME",
    "DEFAULT_MODEL_SPEC",
    "ModelLocation",
    "ModelNotFoundError",
    "Promotion",
    "load_checkpoint_from_mlflow",
    "locate_model",
    "register_and_promote",
    "resolve_model_uri",
    "settle_alias",
]
