"""Command-line latency: how long ``ossnet --help``, each ``ossnet COMMAND --help`` and
``ossnet --version`` take, each in a fresh process, and which heavy libraries they load.

``python -m ossnet_bench.cli [--quick] [--repeats N]``

Every command runs ``--repeats`` times (``--quick``: 3, else 7); the figure is the median wall
time of the whole process (interpreter start-up included), next to the bare interpreter's
(``python -c pass``) for scale. A second run of each command in a process that lists
``sys.modules`` at exit says whether torch, ray, mlflow or zarr were imported.

Last stdout line: one JSON object with ``seconds`` (command -> median s), ``python_seconds``,
``heavy_imports`` (command -> libraries loaded) and ``goals`` (every help under 0.5 s, none
loading torch).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from typing import Any, Sequence

from ossnet_bench._common import emit_result, make_parser, setup_logging

COMMANDS: tuple[tuple[str, ...], ...] = (
    ("--help",), ("--version",), ("quickstart", "--help"), ("ingest", "--help"), ("train", "--help"),
    ("tune", "--help"), ("infer", "--help"), ("jobs", "--help"),
)
HEAVY = ("torch", "ray", "mlflow", "zarr")
GOAL_S = 0.5

_PROBE = """
import sys
sys.argv = ["ossnet", *{argv!r}]
try:
    from ossnet_cli import main
    main(sys.argv[1:])
except SystemExit:
    pass
heavy = sorted(m for m in {heavy!r} if m in sys.modules)
print("HEAVY", ",".join(heavy), file=sys.stderr)
"""


def _wall(argv: Sequence[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - start


def _heavy_imports(command: Sequence[str]) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", _PROBE.format(argv=list(command), heavy=HEAVY)],
                          capture_output=True, text=True, check=False)
    line = next((text for text in proc.stderr.splitlines() if text.startswith("HEAVY")), "HEAVY ")
    return [m for m in line.removeprefix("HEAVY").strip().split(",") if m]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = make_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=None, help="runs per command (default 7, --quick 3)")
    args = parser.parse_args(argv)
    setup_logging()
    repeats = args.repeats or (3 if args.quick else 7)
    python = statistics.median(_wall([sys.executable, "-c", "pass"]) for _ in range(repeats))
    seconds, heavy = {}, {}
    for command in COMMANDS:
        key = " ".join(command)
        seconds[key] = round(statistics.median(
            _wall([sys.executable, "-m", "ossnet_cli", *command]) for _ in range(repeats)), 3)
        heavy[key] = _heavy_imports(command)
        print(f"ossnet {key:<18} {seconds[key]:6.3f} s   loads: {', '.join(heavy[key]) or '-'}", file=sys.stderr)
    result = {
        "seconds": seconds, "python_seconds": round(python, 3), "heavy_imports": heavy, "repeats": repeats,
        "goals": {"help_under_0_5_s": all(s < GOAL_S for s in seconds.values()),
                  "no_torch": not any("torch" in h for h in heavy.values())},
    }
    emit_result(result)
    return result


if __name__ == "__main__":
    main()
