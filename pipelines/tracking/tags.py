"""The MLflow tag names ossnet writes and reads, in one place (training, validation, sweeps).

A tag read by one job and written by another (a sweep reads the model URI a training run
set) must be spelled once; import the names from here, never retype the strings.
"""

from __future__ import annotations

PARENT_RUN_TAG = "mlflow.parentRunId"
RUN_KEY_TAG = "ossnet.run_key"

# Training runs (``ossnet_pipelines.train.driver``, ``ossnet_pipelines.train.validation``).
MODEL_EPOCH_TAG = "ossnet.model_epoch"
MODEL_VERSION_TAG = "ossnet.model_version"
MODEL_URI_TAG = "ossnet.model_uri"
BEST_VAL_DICE_TAG = "ossnet.best_val_dice"
PROMOTED_TAG = "ossnet.promoted"
COLLAPSE_TAG = "ossnet.collapse"  # a validation predicted (almost) no foreground; the value says where

# Promotion evidence on registered versions (``ossnet_pipelines.train.promotion``).
VAL_DICE_TAG = "val_dice"  # the selection score (the best epoch's, the best trial's)
TEST_DICE_TAG = "test_dice"  # the Dice on the store's test split, which decides ``champion``
TEST_SET_TAG = "ossnet.test_set"  # digest of the test cases that score came from
TEST_CASES_TAG = "ossnet.test_cases"
PROMOTION_TAG = "ossnet.promotion"  # the rule and what it decided, one line

# Sweeps (``tune``): trial runs and the parent sweep run.
TRIAL_ID_TAG = "ossnet.tune.trial_id"
TRIAL_STATUS_TAG = "ossnet.tune.status"
TRIAL_SETTINGS_TAG = "ossnet.tune.settings"
SWEEP_TAG = "ossnet.tune.sweep"
REGISTERED_TRIAL_TAG = "ossnet.sweep.registered_trial"
REGISTERED_VERSION_TAG = "ossnet.sweep.model_version"
REGISTERED_URI_TAG = "ossnet.sweep.model_uri"
REGISTERED_PROMOTED_TAG = "ossnet.sweep.promoted"
BEST_TRIAL_TAG = "ossnet.sweep.best_trial"
BEST_RUN_TAG = "ossnet.sweep.best_run"

__all__ = [
    "BEST_RUN_TAG",
    "BEST_TRIAL_TAG",
    "BEST_VAL_DICE_TAG",
    "COLLAPSE_TAG",
    "MODEL_EPOCH_TAG",
    "MODEL_URI_TAG",
    "MODEL_VERSION_TAG",
    "PARENT_RUN_TAG",
    "PROMOTED_TAG",
    "PROMOTION_TAG",
    "REGISTERED_PROMOTED_TAG",
    "REGISTERED_TRIAL_TAG",
    "REGISTERED_URI_TAG",
    "REGISTERED_VERSION_TAG",
    "RUN_KEY_TAG",
    "SWEEP_TAG",
    "TEST_CASES_TAG",
    "TEST_DICE_TAG",
    "TEST_SET_TAG",
    "TRIAL_ID_TAG",
    "TRIAL_SETTINGS_TAG",
    "TRIAL_STATUS_TAG",
    "VAL_DICE_TAG",
]
