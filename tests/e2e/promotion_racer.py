"""One of several promoters racing for ``champion`` (``tests/e2e/test_promotion_race.py``).

Usage: ``python promotion_racer.py TRACKING_URI MODEL_URI NAME SCORE START_AT``. MLflow is imported
and the client built before waiting for ``START_AT`` (a ``time.time()`` value), so every racer
registers within a few milliseconds of the others. Prints the ``Promotion`` as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

import mlflow  # noqa: F401  (imported before the start line: the race is about the registry calls)

from ossnet_pipelines.tracking import register_and_promote


def main(argv: list[str]) -> int:
    uri, model_uri, name, score, start_at = argv
    delay = float(start_at) - time.time()
    if delay > 0:
        time.sleep(delay)
    promotion = register_and_promote(model_uri, name, float(score), "test_dice.race", tracking_uri=uri)
    print(json.dumps(dataclasses.asdict(promotion)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
