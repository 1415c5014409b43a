"""Promotion on evidence nobody selected on: the store's test split decides ``champion``.

Validation cases pick the best epoch of a run and the best trial of a sweep, so their Dice is
optimistic by construction. A model is therefore registered with two scores: ``val_dice`` (the
selection score) and ``test_dice``, the mean full-resolution Dice on the store's ``test`` split,
cases that neither training, checkpoint selection nor the sweep saw. Only the test score moves
``champion`` (``ossnet_pipelines.tracking.settle_alias``): the alias goes to the registered
version with the highest test Dice on the same test cases. A champion scored on other cases (an
older store, or registered before test scores existed) is scored on these cases first; one
that does not fit the store keeps the alias. A store without a test split registers models
without ever promoting them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ossnet.config import ConfigError
from ossnet_pipelines.tracking.tags import (
    PROMOTION_TAG,
    TEST_CASES_TAG,
    TEST_DICE_TAG,
    TEST_SET_TAG,
    VAL_DICE_TAG,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TestSet:
    """The cases whose Dice decides promotion.

    Attributes:
        store: the store URL (absolute).
        case_ids: the test cases, sorted.
        digest: 16 hex digits naming the store and the cases; scores compete only under one digest.
    """

    store: str
    case_ids: tuple[str, ...]
    digest: str

    @classmethod
    def of(cls, store: str, case_ids: Sequence[str]) -> "TestSet":
        ids = tuple(sorted(case_ids))
        digest = hashlib.sha256(json.dumps({"store": store, "cases": ids}).encode()).hexdigest()[:16]
        return cls(store, ids, digest)

    @property
    def score_key(self) -> str:
        """The version tag holding a model's test Dice on exactly these cases."""
        return f"{TEST_DICE_TAG}.{self.digest}"

    @property
    def rule(self) -> str:
        """The promotion rule in words."""
        return (f"champion = highest test Dice on the {len(self.case_ids)} test cases of {self.store} "
                "(no training, checkpoint or sweep selection saw them)")


NO_TEST_SPLIT_RULE = ("champion moves only on test-split Dice, and this store has no test split "
                      "(ingest with --test-fraction, or a split file with test cases)")


@dataclass(frozen=True)
class TestScore:
    """A model's scores on a test set: mean Dice and IoU, and each case's Dice."""

    dice: float
    iou: float
    per_case: dict[str, float]


def score_model(
    model_spec: str,
    test_set: TestSet,
    *,
    mode: str = "mise",
    chunk_points: int = 2**14,
    objective: str = "mean",
    tracking_uri: str | None = None,
    device: str | None = None,
) -> TestScore:
    """Segment every test case with a model and score it at full resolution.

    Args:
        model_spec: anything ``resolve_model_uri`` accepts (``models:/NAME/VERSION``, a
            ``models:/<model_id>``, a checkpoint file).
        test_set: the cases.
        mode, chunk_points: inference settings (``validation.mode``, ``validation.chunk_points``).
        objective: multi-target models: mean Dice over targets or one target's.
        tracking_uri: where the model is registered.
        device: torch device (default CUDA when available).

    Raises:
        ConfigError: the model does not fit the store (channels, grid or targets).
    """
    import torch

    from ossnet.checkpoint import load_checkpoint
    from ossnet.inference import Inferer
    from ossnet_pipelines.data import cached_store
    from ossnet_pipelines.tracking.registry import resolve_model_uri
    from ossnet_pipelines.train.validation import segment_case

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = load_checkpoint(str(resolve_model_uri(model_spec, tracking_uri)), map_location=device)
    store = cached_store(test_set.store)
    config = model.config
    problems = []
    if config.encoder.in_channels != len(store.modalities):
        problems.append(f"{config.encoder.in_channels} input channels, the store has {len(store.modalities)}")
    if tuple(config.volume_shape) != tuple(store.volume_shape):
        problems.append(f"grid {tuple(config.volume_shape)}, the store's is {tuple(store.volume_shape)}")
    if config.targets != store.targets:
        problems.append(f"targets {config.targets.describe()}, the store's are {store.targets.describe()}")
    if problems:
        raise ConfigError(f"model {model_spec} does not fit the store {test_set.store}: {'; '.join(problems)}")
    inferer = Inferer(mode=mode, chunk_points=chunk_points, device=device)
    scores = []
    with torch.no_grad():
        for case_id in test_set.case_ids:
            arrays = store.read_case(case_id, arrays=("image", "label"))
            spacing = store.case_attrs(case_id).get("spacing", (1.0, 1.0, 1.0))
            score, _ = segment_case(model, inferer, arrays, case_id, objective, spacing=spacing)
            scores.append(score)
    return TestScore(dice=float(np.mean([s["dice"] for s in scores])), iou=float(np.mean([s["iou"] for s in scores])),
                     per_case={s["case_id"]: float(s["dice"]) for s in scores})


@dataclass(frozen=True)
class Evidence:
    """A registered model's scores and what promotion decided."""

    val_dice: float
    test: TestScore | None
    version: int | None
    promoted: bool
    message: str


def register_on_test_evidence(
    model_uri: str,
    *,
    model_name: str,
    val_dice: float,
    test_set: TestSet | None,
    tracking_uri: str,
    mode: str = "mise",
    chunk_points: int = 2**14,
    objective: str = "mean",
    tags: Mapping[str, Any] | None = None,
) -> Evidence:
    """Score a logged model on the test set, register it with both scores, settle ``champion``.

    Args:
        model_uri: the logged model (``models:/<model_id>``).
        model_name: the registered model.
        val_dice: its selection score (kept on the version, never compared).
        test_set: the promotion cases (None: the store has none; registered, not promoted).
        tracking_uri: tracking/registry URI.
        mode, chunk_points, objective: how the test cases are segmented and scored.
        tags: extra version tags.
    """
    from ossnet_pipelines.tracking.registry import register_and_promote

    version_tags: dict[str, Any] = {VAL_DICE_TAG: repr(float(val_dice)), **(tags or {})}
    if test_set is None:
        promotion = register_and_promote(model_uri, model_name, None, TEST_DICE_TAG, tracking_uri=tracking_uri,
                                         tags=version_tags, rule=NO_TEST_SPLIT_RULE)
        _tag_promotion(model_name, promotion.version, promotion.message, tracking_uri)
        return Evidence(float(val_dice), None, promotion.version, False, promotion.message)
    settings = {"mode": mode, "chunk_points": chunk_points, "objective": objective, "tracking_uri": tracking_uri}
    logger.info("scoring %s on %d test cases", model_uri, len(test_set.case_ids))
    try:
        test = score_model(model_uri, test_set, **settings)  # type: ignore[arg-type]
    except Exception as exc:  # a broken test case must not lose the trained model: register it unpromoted
        reason = " ".join(str(exc).split()) or type(exc).__name__
        logger.error("could not score %s on the test split: %s", model_uri, reason)
        rule = f"{test_set.rule}; this model could not be scored on them ({reason[:300]})"
        promotion = register_and_promote(model_uri, model_name, None, test_set.score_key, tracking_uri=tracking_uri,
                                         tags=version_tags, rule=rule)
        _tag_promotion(model_name, promotion.version, promotion.message, tracking_uri)
        return Evidence(float(val_dice), None, promotion.version, False, promotion.message)
    version_tags.update({TEST_DICE_TAG: repr(test.dice), TEST_SET_TAG: test_set.digest,
                         TEST_CASES_TAG: len(test_set.case_ids)})

    def rescore(version: int) -> float | None:
        try:
            return score_model(f"models:/{model_name}/{version}", test_set, **settings).dice  # type: ignore[arg-type]
        except ConfigError as exc:
            logger.warning("cannot score the current champion on the test cases: %s", exc)
            return None

    promotion = register_and_promote(model_uri, model_name, test.dice, test_set.score_key, tracking_uri=tracking_uri,
                                     tags=version_tags, rescore=rescore, rule=test_set.rule)
    _tag_promotion(model_name, promotion.version, promotion.message, tracking_uri)
    return Evidence(float(val_dice), test, promotion.version, promotion.promoted, promotion.message)


def _tag_promotion(name: str, version: int, message: str, tracking_uri: str) -> None:
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri).set_model_version_tag(
        name, str(version), PROMOTION_TAG, message)


__all__ = ["Evidence", "NO_TEST_SPLIT_RULE", "TestScore", "TestSet", "register_on_test_evidence", "score_model"]
