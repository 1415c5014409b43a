"""``python tests/ray/failing_trial_sweep.py LR ossnet-args...``: the ``ossnet`` command with a sweep
whose trials sampled with learning rate ``LR`` fail before training (a test-only trial hook).

The sweep tests run their drivers as subprocesses; this wrapper installs the hook through
``run_sweep(trial_hook=...)``, so the product reads no fault-injection setting of its own.
"""

from __future__ import annotations

import functools
import math
import sys
from typing import Any, Mapping

FAILING_LR = float(sys.argv[1])


def fail_the_chosen_trial(settings: Mapping[str, Any], trial_id: str) -> None:
    """Pickled by value to the trial actors (it lives in ``__main__``)."""
    if math.isclose(float(settings.get("lr", -1.0)), FAILING_LR, rel_tol=1e-9):
        raise RuntimeError(f"injected failure of trial {trial_id} (lr {FAILING_LR})")


if __name__ == "__main__":
    import ossnet_tune.sweep
    from ossnet_cli import main

    # ``ossnet tune`` looks run_sweep up in ossnet_tune.sweep when it runs
    ossnet_tune.sweep.run_sweep = functools.partial(ossnet_tune.sweep.run_sweep, trial_hook=fail_the_chosen_trial)
    sys.exit(main(sys.argv[2:]))
