"""The main job on the embedded default: synthetic data -> Zarr -> Ray Train -> MLflow -> batch MISE.

Runs every stage of the project on one machine with nothing to download:

1. writes seeded hard BraTS-like phantoms (4 modalities; every lesion tissue shares its
   intensity with a normal tissue in each modality, so no intensity window finds it) as a BraTS
   2020 NIfTI archive, plus held-out cases in a second folder;
2. ingests the archive into a chunked Zarr v3 store (``ossnet ingest``);
3. trains OSS-Net variant C through Ray Train on the local Ray instance, validating with dense
   Dice through MISE, tracking the run in the local MLflow (SQLite) and registering the model
   (``ossnet train --config configs/quickstart.yaml``);
4. segments the held-out cases with the registered model by low-res-start MISE in a Ray Data
   batch job (``ossnet infer``), writes a NIfTI mask per case and a report, and a PNG of image,
   reference and prediction slices; prints the model's Dice next to the trivial baseline's (the
   best single-channel intensity window, tuned per held-out case on its own label).

Every stage is idempotent: re-running resumes training from its last checkpoint and skips the
cases that are already ingested or segmented.

``--task regions`` runs the same four stages for the BraTS tumour regions (whole tumour, tumour
core, enhancing tumour: ``ossnet.targets`` "brats-regions"): the phantoms label oedema,
necrosis and enhancing core with the BraTS values, the store keeps them, the model has three
outputs, and the held-out masks are written as BraTS label maps, scored per region.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
QUICKSTART_CONFIG = PROJECT_ROOT / "configs" / "quickstart.yaml"
#: ``--task``: the paper's binary whole-tumour model, or the three nested BraTS regions.
TASK_TARGETS: dict[str, str] = {"binary": "binary", "regions": "brats-regions"}


@dataclass(frozen=True)
class QuickstartOptions:
    """Settings of the quickstart job (defaults finish in a few minutes on 2 CPU cores).

    Attributes:
        out_dir: folder for the archive, store, checkpoints and predictions.
        n_cases: synthetic cases in the training archive (train, validation and test splits:
            12, 2 and 2 by default; the test cases decide ``champion``).
        n_heldout: synthetic cases segmented by the batch inference job at the end.
        seed: data seed (the training seed comes from the config).
        config: training YAML.
        overrides: ``key=value`` overrides of the training config.
        tracking_uri: MLflow tracking URI (default: ``$MLFLOW_TRACKING_URI``, else the local
            SQLite database in ``.ossnet/``).
        task: "binary" (whole tumour, the paper) or "regions" (WT, TC, ET; its own store and
            registered model, ``ossnet-regions``).
    """

    out_dir: Path = Path(".ossnet/quickstart")
    n_cases: int = 16
    n_heldout: int = 3
    seed: int = 0
    config: Path = QUICKSTART_CONFIG
    overrides: tuple[str, ...] = ()
    tracking_uri: str | None = None
    task: str = "binary"


@dataclass(frozen=True)
class QuickstartResult:
    """What the quickstart measured and wrote."""

    store: str
    train: Any  # ossnet_pipelines.train.TrainResult
    infer: Any  # ossnet_pipelines.infer.InferReport
    png: Path | None
    tracking_uri: str
    window_dice: dict[str, dict[str, float]]  # target -> case id -> trivial-baseline Dice on the held-out cases
    model_name: str = "ossnet"  # the registered model


def _write_archives(
    opts: QuickstartOptions, volume_shape: tuple[int, int, int]
) -> tuple[Path, Path, dict[str, dict[str, float]]]:
    """The training and held-out archives, and the trivial baseline's Dice per target and
    held-out case."""
    from ossnet.baselines.window import best_window
    from ossnet.phantoms import phantom_dataset
    from ossnet_pipelines.synthetic import write_brats_archive

    from ossnet.targets import target_preset

    archive, heldout = opts.out_dir / "archive", opts.out_dir / "heldout"
    regions = opts.task == "regions"
    cases = phantom_dataset("brats", n=opts.n_cases + opts.n_heldout, shape=volume_shape, seed=opts.seed,
                            level="hard", sub_regions=regions)
    write_brats_archive(cases[: opts.n_cases], archive)
    write_brats_archive(cases[opts.n_cases :], heldout)
    targets = target_preset(TASK_TARGETS[opts.task])
    masks = {c.case_id: targets.region_masks(c.label) for c in cases[opts.n_cases :]}
    window = {name: {c.case_id: best_window(c.image, masks[c.case_id][t]).dice for c in cases[opts.n_cases :]}
              for t, name in enumerate(targets.names)}
    logger.info("wrote %d training and %d held-out synthetic cases under %s", opts.n_cases, opts.n_heldout, opts.out_dir)
    return archive, heldout, window


def _overlay_png(heldout: Path, report: Any, out_dir: Path) -> Path | None:
    """PNG of the first segmented held-out case: image, reference and prediction slices."""
    import nibabel as nib

    from ossnet_pipelines.figures import slice_overlay_png

    done = [c for c in report.cases if c.status in ("ok", "skipped") and c.mask]
    if not done:
        return None
    case = done[0]
    folder = heldout / case.case_id
    image = np.asarray(nib.load(str(folder / f"{case.case_id}_flair.nii.gz")).dataobj, dtype=np.float32)
    reference = np.asarray(nib.load(str(folder / f"{case.case_id}_seg.nii.gz")).dataobj) > 0
    mask = np.asarray(nib.load(case.mask.removeprefix("file://")).dataobj) > 0
    title = f"{case.case_id}  OSS-Net C, low-res-start MISE  Dice {case.dice:.3f}  (flair shown)"
    return slice_overlay_png(image, reference, mask, out_dir / f"{case.case_id}.png", title=title)


def ingest_own_store(job: Any) -> Any:
    """``ingest(job)`` into a store that holds only data the quickstart generates: a store an
    older ossnet wrote (another format or preprocessing) is rebuilt, with a warning, not refused.

    Args:
        job: the ``IngestJob``. Returns its ``IngestReport``.
    """
    from ossnet_pipelines.ingest import IngestError, ingest
    from ossnet_pipelines.store import StoreError

    try:
        return ingest(job)
    except IngestError as exc:
        if not isinstance(exc.__cause__, StoreError):
            raise
        logger.warning("quickstart: rebuilding %s (%s)", job.store, exc)
        return ingest(job.updated({"overwrite": True}))


def run_quickstart(opts: QuickstartOptions) -> QuickstartResult:
    """Run all four stages; returns what each produced."""
    from ossnet_pipelines.infer.job import InferJob
    from ossnet_pipelines.infer.run import run_inference
    from ossnet_pipelines.ingest import IngestJob
    from ossnet_pipelines.tracking import resolve_tracking_uri
    from ossnet_pipelines.train import load_train_job, train

    out = Path(opts.out_dir).resolve()
    opts = QuickstartOptions(**{**opts.__dict__, "out_dir": out})
    out.mkdir(parents=True, exist_ok=True)
    uri = resolve_tracking_uri(opts.tracking_uri)
    # Ray workers and MLflow's registry lookups read the URI from the environment.
    os.environ["MLFLOW_TRACKING_URI"] = uri
    if opts.task not in TASK_TARGETS:
        raise ValueError(f"task: must be one of {', '.join(TASK_TARGETS)}, got {opts.task!r}")
    store = str(out / "store.zarr")
    task_overrides = [("tracking.model_name", "ossnet-regions")] if opts.task == "regions" else []
    job = load_train_job(opts.config, [("store", store), ("tracking.uri", uri), *task_overrides, *opts.overrides])

    logger.info("[1/4] synthetic NIfTI archive")
    from ossnet.config import model_config

    shape = tuple(model_config(job.model.variant, job.model.preset).volume_shape)
    archive, heldout, window = _write_archives(opts, shape)  # type: ignore[arg-type]

    logger.info("[2/4] ingest into %s", store)
    ingested = ingest_own_store(IngestJob(source=str(archive), store=store, layout="brats", preset=job.model.preset,
                                          val_fraction=0.125, test_fraction=0.125, split_seed=opts.seed,
                                          executor="serial",
                                          targets=TASK_TARGETS[opts.task]))
    if not ingested.ok:
        raise RuntimeError("quickstart: ingestion failed:\n" + ingested.table())

    logger.info("[3/4] train OSS-Net %s with Ray Train, tracked in %s", job.model.variant, uri)
    trained = train(job, config_path=opts.config)

    logger.info("[4/4] batch inference over the held-out cases")
    model = (f"models:/{job.tracking.model_name}/{trained.model_version}" if trained.model_version
             else str(trained.best_checkpoint))
    report = run_inference(InferJob(input=str(heldout), output=str(out / "predictions"), model=model,
                                    tracking_uri=uri, mode="auto"))
    png = _overlay_png(heldout, report, out)
    return QuickstartResult(store=store, train=trained, infer=report, png=png, tracking_uri=uri, window_dice=window,
                            model_name=job.tracking.model_name)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the quickstart flags."""
    d = QuickstartOptions()
    parser.allow_abbrev = False
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: .ossnet/quickstart, .ossnet/quickstart-regions for --task regions)")
    parser.add_argument("--task", choices=tuple(TASK_TARGETS), default=d.task,
                        help="binary: the whole tumour, as the paper (default); regions: whole tumour, tumour core and "
                             "enhancing tumour, nested sigmoid outputs, BraTS label maps written")
    parser.add_argument("--cases", type=int, default=d.n_cases, help="synthetic training cases (default: %(default)s)")
    parser.add_argument("--heldout", type=int, default=d.n_heldout,
                        help="held-out cases segmented at the end (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=d.seed, help="data seed (default: %(default)s)")
    parser.add_argument("--config", type=Path, default=d.config, help="training config (default: configs/quickstart.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a training config value, e.g. --set train.epochs=4 (repeatable)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else .ossnet/mlflow.db)")


def run_cli(args: argparse.Namespace) -> int:
    """Handler of ``ossnet quickstart``."""
    out = args.out or (Path(".ossnet/quickstart-regions") if args.task == "regions" else QuickstartOptions().out_dir)
    opts = QuickstartOptions(out_dir=out, n_cases=args.cases, n_heldout=args.heldout, seed=args.seed,
                             config=args.config, overrides=tuple(args.overrides), tracking_uri=args.tracking_uri,
                             task=args.task)
    t0 = time.monotonic()
    res = run_quickstart(opts)
    tr, rep = res.train, res.infer
    db = res.tracking_uri
    print()
    print(f"store:       {res.store}")
    print(f"training:    run {tr.run_name}, {tr.epochs} epochs, best validation Dice "
          f"{tr.best_val_dice:.4f} (epoch {tr.best_epoch})" if tr.best_val_dice is not None
          else f"training:    run {tr.run_name}, {tr.epochs} epochs")
    print(f"mlflow run:  {tr.mlflow_run_id}")
    print(f"model:       {tr.model_uri} version {tr.model_version}"
          f"{f' (now models:/{res.model_name}@champion)' if tr.promoted else ''}")
    if tr.test_dice is not None:
        print(f"test Dice:   {tr.test_dice:.4f} on the store's test split; {tr.promotion}")
    print(rep.summary())
    window = {name: cases for name, cases in res.window_dice.items() if cases}  # none without held-out cases
    if len(window) > 1:
        per_target = ", ".join(f"{name} {np.mean(list(cases.values())):.4f}" for name, cases in window.items())
        print(f"baseline:    best single-channel intensity window per region, tuned on each held-out case's own "
              f"label: mean Dice {per_target}")
    elif window:
        (cases,) = window.values()
        print(f"baseline:    best single-channel intensity window, tuned per held-out case on its own label: "
              f"mean Dice {np.mean(list(cases.values())):.4f} over {len(cases)} cases")
    if res.png is not None:
        print(f"slices:      {res.png}")
    print(f"MLflow UI:   .venv/bin/mlflow ui --backend-store-uri {db} --host 127.0.0.1 --port 5000")
    print(f"done in {time.monotonic() - t0:.0f} s")
    return 0 if rep.ok else 1
