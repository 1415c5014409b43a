"""Sweep configs without Ray: search-space parsing and validation, trial overrides, the Optuna
define-by-run space, trial resources and concurrency, the summary table, the tune CLI parser."""

from __future__ import annotations

import argparse
import csv
import io
import math
from pathlib import Path
from typing import Any

import optuna
import pytest

from ossnet.config import ConfigError
from ossnet_pipelines.jobconfig import dump_yaml
from ossnet_tune.cli import configure_tune_parser, job_from_args, run_tune_cli
from ossnet_tune.job import TuneJob, load_tune_job
from ossnet_tune.space import OptunaSpace, SearchSpace, parse_patch_choice, trial_overrides, trial_settings
from ossnet_tune.summary import best_trial, rank_trials, status_counts, summarize_trial, to_csv, to_markdown
from ossnet_tune.sweep import derive_max_concurrent, trial_actor_resources, trial_resources
from ossnet_tune.trial import trial_job, trial_run_name

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
ODD_GRID = [37, 41, 29]


def tune_job(**overrides: Any) -> TuneJob:
    """A sweep over an odd 37x41x29 grid (no store is opened by parsing)."""
    data: dict[str, Any] = {"store": "/data/s.zarr", "model": {"preset": "tiny", "volume_shape": ODD_GRID},
                            "scaling": {"num_workers": 1}}
    job = TuneJob.parse(data)
    if overrides:
        from ossnet_pipelines.jobconfig import apply_overrides

        job = TuneJob.parse(apply_overrides(job.to_dict(), overrides.items()))
    return job


def error_of(**overrides: Any) -> str:
    with pytest.raises(ConfigError) as info:
        tune_job(**overrides)
    return str(info.value)


# --------------------------------------------------------------------------- parsing, defaults


def test_defaults_search_all_five_parameters_with_the_documented_ranges() -> None:
    job = tune_job()
    space = job.space
    assert space.searched() == ("alpha", "patch_size", "border_ratio", "band_width", "lr")
    assert (space.alpha.low, space.alpha.high, space.alpha.zero) == (0.01, 1.0, True)
    assert math.isclose(math.sqrt(space.alpha.low * space.alpha.high), 0.1)  # log-uniform around 0.1
    assert [c.label for c in space.patch_choices] == ["5", "7", "9", "7+14"]
    assert (space.border_ratio.low, space.border_ratio.high) == (0.0, 0.9)
    assert (space.band_width.low, space.band_width.high) == (2, 8)
    assert space.lr.low < space.lr.high
    assert job.max_t == job.base.train.epochs
    assert job.name.startswith("tune-tiny-C-")


def test_shipped_quickstart_sweep_parses_and_round_trips(tmp_path: Path) -> None:
    job = load_tune_job(CONFIGS / "quickstart-tune.yaml")
    # What the quickstart needs, not the file's numbers: trials train inside their Tune actors (no
    # extra workers on a laptop), there is something to compare, and ASHA gets a score every epoch
    # early enough to stop the weak trials.
    assert job.base.scaling.num_workers == 0 and job.sweep.num_samples >= 2
    assert job.base.train.validate_every == 1 and job.scheduler.reduction_factor > 1
    assert job.scheduler.grace_period < job.max_t
    again = TuneJob.parse(job.to_dict())
    assert again == job
    path = tmp_path / "t.yaml"
    path.write_text(dump_yaml(job))
    assert load_tune_job(path, ["sweep.num_samples=3", "space.lr=null"]).space.lr is None


def test_null_takes_a_parameter_out_of_the_search_and_all_null_is_an_error() -> None:
    job = tune_job(**{"space.alpha": None, "space.patch_size": None})
    assert job.space.searched() == ("border_ratio", "band_width", "lr")
    assert "every parameter is null" in error_of(**{f"space.{p}": None for p in SearchSpace().searched()})


def test_sweep_name_is_stable_ignores_run_settings_and_follows_the_space() -> None:
    job = tune_job()
    assert tune_job(**{"sweep.num_samples": 40, "sweep.max_concurrent_trials": 3}).name == job.name
    assert tune_job(**{"space.lr.high": 5e-3}).name != job.name
    assert tune_job(**{"sweep.seed": 1}).name != job.name
    assert tune_job(**{"sweep.name": "mine"}).name == "mine"
    resolved = job.resolved()
    assert resolved.sweep.name == job.name and Path(resolved.sweep.storage_path).is_absolute()
    assert resolved.experiment_path.endswith("/" + job.name)


# --------------------------------------------------------------------------- validation errors


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"space.momentum": {"low": 0.1, "high": 0.9}}, "space.momentum: unknown field; expected one of: alpha, patch_size"),
        ({"space.lr.step": 2}, "space.lr.step: unknown field"),
        ({"space.alpha.low": 0.5, "space.alpha.high": 0.5}, "space.alpha: empty range: low (0.5) must be < high (0.5)"),
        ({"space.lr.low": 1e-2, "space.lr.high": 1e-3}, "space.lr: empty range"),
        ({"space.border_ratio.low": 0.7, "space.border_ratio.high": 0.2}, "space.border_ratio: empty range"),
        ({"space.band_width.low": 5, "space.band_width.high": 5}, "space.band_width: empty range"),
        ({"space.border_ratio.high": 1.5}, "space.border_ratio.high: must be <= 1.0"),
        ({"space.alpha.low": 0.0}, "space.alpha.low: must be > 0.0"),
        ({"space.band_width.low": 2.5}, "space.band_width.low: expected an integer"),
        ({"space.patch_size": [5, 6]}, "space.patch_size[1]: patch size 6 must be an odd integer >= 1"),
        ({"space.patch_size": [0]}, "space.patch_size[0]: patch size 0 must be an odd integer >= 1"),
        ({"space.patch_size": [-3]}, "space.patch_size[0]: -3 is not a patch size"),
        ({"space.patch_size": ["7+12"]}, "space.patch_size[0]: '7+12': the pooled window must be twice the patch (7+14)"),
        ({"space.patch_size": ["big"]}, "space.patch_size[0]: 'big' is not a patch size"),
        ({"space.patch_size": [7, "7"]}, "space.patch_size: duplicate choices 7"),
        ({"space.patch_size": []}, "space.patch_size: no choices"),
        ({"space.patch_size": [5, 31]}, "space.patch_size[1]: '31' reads a 31^3 window, larger than the (37, 41, 29) grid"),
        ({"space.patch_size": ["15+30"]}, "space.patch_size[0]: '15+30' reads a 30^3 window"),
        ({"model.variant": "onet"}, "space.patch_size: variant onet has no patches"),
        ({"model.variant": "A"}, "space.alpha: variant A has no low-resolution head"),
        ({"train.validate_every": 2}, "train.validate_every: a sweep compares trials by val_dice at every epoch"),
        ({"scheduler.grace_period": 60}, "scheduler.grace_period: 60 epochs exceeds train.epochs (50)"),
        ({"scheduler.reduction_factor": 1.0}, "scheduler.reduction_factor: must be > 1.0"),
        ({"sweep.name": "a b"}, "sweep.name: 'a b' must be 1-100 letters"),
        ({"sweep.num_samples": 0}, "sweep.num_samples: must be >= 1"),
        ({"train.epochs": 0}, "train.epochs: must be >= 1"),
    ],
)
def test_bad_space_or_sweep_settings_name_the_field(overrides: dict[str, Any], expected: str) -> None:
    assert expected in error_of(**overrides)


def test_largest_patch_that_fits_the_odd_grid_is_accepted() -> None:
    job = tune_job(**{"space.patch_size": [29, "13+26", 3]})  # 29 = the smallest grid edge
    assert [c.extent for c in job.space.patch_choices] == [29, 26, 3]


def test_unknown_top_level_section_lists_train_and_sweep_sections() -> None:
    with pytest.raises(ConfigError, match=r"^spaces: unknown field; expected one of: store, model, .*space, sweep, scheduler"):
        TuneJob.parse({"store": "/s.zarr", "spaces": {}})


def test_points_to_evaluate_are_checked_against_the_space() -> None:
    good = {"aux_loss": True, "alpha": 0.1, "patch_size": 7, "border_ratio": 0.5, "band_width": 6, "lr": 1e-3}
    job = tune_job(**{"sweep.points_to_evaluate": [good]})
    assert job.space.normalized_point(job.sweep.points_to_evaluate[0])["patch_size"] == "7"
    no_aux = {k: v for k, v in good.items() if k != "alpha"} | {"aux_loss": False}
    assert tune_job(**{"sweep.points_to_evaluate": [no_aux]}).sweep.points_to_evaluate[0]["aux_loss"] is False
    assert "points_to_evaluate[0].momentum: not a searched parameter" in error_of(
        **{"sweep.points_to_evaluate": [{**good, "momentum": 0.9}]})
    assert "points_to_evaluate[0].lr: 0.5 is outside [0.0001, 0.003]" in error_of(
        **{"sweep.points_to_evaluate": [{**good, "lr": 0.5}]})
    assert "points_to_evaluate[0].band_width: 4.5 is outside" in error_of(
        **{"sweep.points_to_evaluate": [{**good, "band_width": 4.5}]})
    assert "points_to_evaluate[0].patch_size: '5+10' is not one of 5, 7, 9, 7+14" in error_of(
        **{"sweep.points_to_evaluate": [{**good, "patch_size": "5+10"}]})
    assert "points_to_evaluate[0].border_ratio: missing" in error_of(
        **{"sweep.points_to_evaluate": [{k: v for k, v in good.items() if k != "border_ratio"}]})
    assert "only 1 trials" in error_of(**{"sweep.points_to_evaluate": [good, good], "sweep.num_samples": 1})


# --------------------------------------------------------------------------- trials


def test_patch_choices_map_onto_variants_and_patch_sizes() -> None:
    assert parse_patch_choice(" 9 ").label == "9" and parse_patch_choice("5+10").multiscale
    cfg = {"aux_loss": True, "alpha": 0.2, "patch_size": "7+14", "border_ratio": 0.3, "band_width": 4, "lr": 2e-3}
    assert dict(trial_overrides(cfg, "C")) == {
        "train.alpha": 0.2, "model.variant": "D", "model.patch_size": 7, "sampling.border_ratio": 0.3,
        "sampling.band_width": 4, "train.lr": 2e-3}
    assert dict(trial_overrides({"patch_size": "5+10"}, "A"))["model.variant"] == "B"
    assert dict(trial_overrides({"patch_size": "9"}, "D")) == {"model.variant": "C", "model.patch_size": 9}
    assert dict(trial_overrides({"patch_size": "9"}, "B"))["model.variant"] == "A"
    off = {"aux_loss": False, "lr": 1e-3}
    assert trial_settings(off) == {"alpha": 0.0, "lr": 1e-3}
    assert dict(trial_overrides(off, "C"))["train.alpha"] == 0.0


def test_trial_job_is_a_validated_training_job_that_never_registers() -> None:
    job = tune_job().resolved()
    cfg = {"aux_loss": True, "alpha": 0.05, "patch_size": "7+14", "border_ratio": 0.25, "band_width": 3, "lr": 1e-3}
    name = trial_run_name(job.name, "abc12_00003")
    tj = trial_job(job.base, cfg, run_name=name, storage_path="/tmp/sweep/trials")
    assert tj.run_name == name and tj.run.storage_path == "/tmp/sweep/trials"
    assert not tj.tracking.register and tj.tracking.enabled
    assert (tj.model.variant, tj.model.patch_size, tj.train.alpha, tj.train.lr) == ("D", 7, 0.05, 1e-3)
    assert (tj.sampling.border_ratio, tj.sampling.band_width) == (0.25, 3)
    model = tj.model.build()
    assert model.patch.multiscale and model.patch.size == 7 and tuple(model.volume_shape) == tuple(ODD_GRID)
    with pytest.raises(ConfigError, match=r"sampling.border_ratio: must be in \[0, 1\], got 1.5"):
        trial_job(job.base, {"border_ratio": 1.5}, run_name=name, storage_path="/tmp/x")


def _sample(space: SearchSpace, seed: int, n: int) -> list[dict[str, Any]]:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=3))
    define = OptunaSpace(space)
    out = []
    for i in range(n):
        trial = study.ask()
        define(trial)
        out.append(dict(trial.params))
        study.tell(trial, float(trial.params.get("lr", 0.0) * 100 + i * 0.01))  # TPE past its startup trials
    return out


def test_optuna_space_samples_in_range_with_the_conditional_alpha_and_is_seeded() -> None:
    space = tune_job().space
    samples = _sample(space, seed=3, n=12)
    assert samples == _sample(space, seed=3, n=12)
    assert samples != _sample(space, seed=4, n=12)
    for s in samples:
        assert ("alpha" in s) == s["aux_loss"]
        if s["aux_loss"]:
            assert 0.01 <= s["alpha"] <= 1.0
        assert s["patch_size"] in ("5", "7", "9", "7+14")
        assert 0.0 <= s["border_ratio"] <= 0.9 and 2 <= s["band_width"] <= 8 and isinstance(s["band_width"], int)
        assert 1e-4 <= s["lr"] <= 3e-3
    assert {s["aux_loss"] for s in samples} == {True, False}
    fixed_alpha = tune_job(**{"space.alpha.zero": False, "space.patch_size": None}).space
    for s in _sample(fixed_alpha, seed=0, n=4):
        assert "aux_loss" not in s and "alpha" in s and "patch_size" not in s


# --------------------------------------------------------------------------- resources


def test_trial_resources_count_driver_workers_and_one_data_task() -> None:
    job = tune_job(**{"scaling.num_workers": 2, "scaling.resources_per_worker": {"CPU": 0.5},
                      "train.batch_size": 4, "data.cpus_per_task": 0.25, "sweep.trial_cpus": 0.25})
    assert trial_resources(job.base, job.sweep.trial_cpus) == {"CPU": 1.5}
    gpu = tune_job(**{"scaling.num_workers": 2, "scaling.use_gpu": True, "train.batch_size": 4})
    assert trial_resources(gpu.base, 0.5) == {"CPU": 3.5, "GPU": 2.0}
    assert trial_actor_resources(gpu.base, 0.5) == {"CPU": 0.5}


def test_a_local_mode_trial_trains_in_its_tune_actor_with_one_workers_resources() -> None:
    job = tune_job(**{"scaling.num_workers": 0, "scaling.resources_per_worker": {"CPU": 0.5},
                      "data.cpus_per_task": 0.25, "sweep.trial_cpus": 0.25})
    assert trial_actor_resources(job.base, job.sweep.trial_cpus) == {"CPU": 0.5}
    assert trial_resources(job.base, job.sweep.trial_cpus) == {"CPU": 0.75}
    gpu = tune_job(**{"scaling.num_workers": 0, "scaling.use_gpu": True})
    assert trial_actor_resources(gpu.base, 0.5) == {"CPU": 1.0, "GPU": 1.0}


@pytest.mark.parametrize(
    ("per_trial", "cluster", "samples", "expected"),
    [
        ({"CPU": 1.0}, {"CPU": 4.0}, 16, 4),
        ({"CPU": 1.5}, {"CPU": 4.0}, 16, 2),
        ({"CPU": 1.0}, {"CPU": 4.0}, 3, 3),
        ({"CPU": 0.3}, {"CPU": 0.9}, 16, 3),  # float division must not lose a trial to rounding
        ({"CPU": 3.5, "GPU": 2.0}, {"CPU": 64.0, "GPU": 8.0}, 16, 4),  # GPUs are the limit
    ],
)
def test_max_concurrent_trials_follow_from_the_scarcest_resource(
    per_trial: dict[str, float], cluster: dict[str, float], samples: int, expected: int
) -> None:
    assert derive_max_concurrent(per_trial, cluster, samples) == expected


def test_a_trial_larger_than_the_cluster_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="one trial needs 2 GPU .* but the cluster has 0"):
        derive_max_concurrent({"CPU": 1.0, "GPU": 2.0}, {"CPU": 8.0}, 4)


# --------------------------------------------------------------------------- summary


def rows(*scores: float | None) -> list[dict[str, Any]]:
    return [{"epoch": float(i + 1), "val_dice": math.nan if s is None else s,
             "checkpoint_path": f"/ckpt/{i + 1}" if s is not None else math.nan} for i, s in enumerate(scores)]


def test_trial_status_score_and_error_come_from_tune_state_and_rows() -> None:
    cfg = {"aux_loss": False, "lr": 1e-3, "patch_size": "7"}
    done = summarize_trial("t1", "s-t1", "TERMINATED", cfg, rows(0.2, 0.5, 0.4), None, max_t=3)
    assert (done.status, done.best_val_dice, done.best_epoch, done.last_val_dice) == ("completed", 0.5, 2, 0.4)
    assert done.checkpoint_path == "/ckpt/2" and done.settings == {"alpha": 0.0, "patch_size": "7", "lr": 1e-3}
    stopped = summarize_trial("t2", "s-t2", "TERMINATED", cfg, rows(0.1), None, max_t=3)
    assert stopped.status == "early_stopped" and stopped.epochs == 1
    trace = "Traceback (most recent call last):\n  File x\nRuntimeError: boom in epoch 2\n"
    failed = summarize_trial("t3", "s-t3", "ERROR", cfg, rows(0.9), trace, max_t=3)
    assert failed.status == "failed" and failed.error == "RuntimeError: boom in epoch 2"
    pending = summarize_trial("t4", "s-t4", "PENDING", cfg, [], None, max_t=3)
    assert pending.status == "unfinished" and pending.best_val_dice is None and pending.checkpoint_path is None
    tie = summarize_trial("t5", "s-t5", "TERMINATED", cfg, rows(0.5, None, 0.5), None, max_t=3)
    assert tie.best_epoch == 3  # ties go to the later epoch, like the kept checkpoint


def test_ranking_puts_failed_trials_last_and_never_picks_them_as_best() -> None:
    cfg = {"lr": 1e-3}
    trials = [
        summarize_trial("a", "s-a", "TERMINATED", cfg, rows(0.3, 0.4, 0.45), None, 3),
        summarize_trial("b", "s-b", "ERROR", cfg, rows(0.99), "ValueError: x", 3),
        summarize_trial("c", "s-c", "TERMINATED", cfg, rows(0.6), None, 3),
        summarize_trial("d", "s-d", "PENDING", cfg, [], None, 3),
    ]
    ranked = rank_trials(trials)
    assert [t.trial_id for t in ranked] == ["c", "a", "d", "b"]
    assert best_trial(trials).trial_id == "c"
    assert status_counts(trials) == {"completed": 1, "early_stopped": 1, "failed": 1, "unfinished": 1}
    table = list(csv.DictReader(io.StringIO(to_csv(trials, ("lr",)))))
    assert [r["trial"] for r in table] == ["c", "a", "d", "b"]
    assert table[0] == {"rank": "1", "trial": "c", "status": "early_stopped", "val_dice": "0.6", "best_epoch": "1",
                        "epochs": "1", "lr": "0.001", "mlflow_run_id": "", "error": ""}
    assert table[3]["error"] == "ValueError: x"
    md = to_markdown(trials, ("lr",)).splitlines()
    assert md[0].startswith("| rank | trial | status") and "error" in md[0] and "mlflow_run_id" not in md[0]
    assert len(md) == 2 + len(trials) and "| c " in md[2]
    assert best_trial([trials[1], trials[3]]) is None


# --------------------------------------------------------------------------- CLI


def parse(*argv: str) -> argparse.Namespace:
    return configure_tune_parser(argparse.ArgumentParser(prog="ossnet tune")).parse_args(list(argv))


def test_cli_flags_map_onto_the_config_and_bad_input_exits_2(tmp_path: Path) -> None:
    args = parse("--config", str(CONFIGS / "quickstart-tune.yaml"), "--num-samples", "5", "--seed", "7",
                 "--set", "space.lr.high=5e-3", "--name", "s1")
    job = job_from_args(args)
    assert (job.sweep.num_samples, job.sweep.seed, job.space.lr.high, job.name) == (5, 7, 5e-3, "s1")
    with pytest.raises(SystemExit):
        parse("--num-sample", "5")  # no abbreviations
    with pytest.raises(ConfigError, match="--retry-failed: only with --resume"):
        job_from_args(parse("--config", str(CONFIGS / "quickstart-tune.yaml"), "--retry-failed"))
    out, err = io.StringIO(), io.StringIO()
    missing = str(tmp_path / "absent.zarr")
    code = run_tune_cli(parse("--config", str(CONFIGS / "quickstart-tune.yaml"), "--store", missing, "--dry-run"),
                        out=out, err=err)
    assert code == 2 and err.getvalue().startswith("error: store:") and "make quickstart" in err.getvalue()
    code = run_tune_cli(parse("--config", str(CONFIGS / "quickstart-tune.yaml"), "--set", "space.patch_size=[4]"),
                        out=out, err=err)
    assert code == 2 and "space.patch_size[0]: patch size 4 must be an odd integer" in err.getvalue()


def test_address_submits_the_resolved_sweep_as_a_cli_job(monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from ossnet_pipelines import jobs

    calls: list[tuple[str, list[str]]] = []
    monkeypatch.setattr(jobs, "submit_cli_command", lambda address, argv, **kw: calls.append((address, argv)) or 0)
    args = parse("--config", str(CONFIGS / "quickstart-tune.yaml"), "--num-samples", "3", "--resume",
                 "--address", "http://127.0.0.1:8275")
    out = io.StringIO()
    assert run_tune_cli(args, out=out, err=io.StringIO()) == 0
    (address, argv), = calls
    assert address == "http://127.0.0.1:8275" and argv[0] == "tune" and argv[-1] == "--resume"
    submitted = job_from_args(parse("--config-json", argv[argv.index("--config-json") + 1]))
    local = job_from_args(parse("--config", str(CONFIGS / "quickstart-tune.yaml"), "--num-samples", "3")).resolved()
    assert submitted == local and Path(submitted.base.store).is_absolute() and submitted.sweep.num_samples == 3
    assert f"submitting sweep {local.name}" in out.getvalue()
    assert json.loads(argv[argv.index("--config-json") + 1])["sweep"]["name"] == local.name
