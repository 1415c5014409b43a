"""Job configs: YAML + overrides -> frozen pydantic models, errors naming the field, run names, CLI."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Literal, Optional

import pytest
from pydantic import Field, model_validator

from ossnet.config import ConfigError, SamplingConfig
from ossnet_pipelines.jobconfig import (
    Checked,
    Job,
    JobModel,
    apply_overrides,
    config_hash,
    dump_yaml,
    load_job,
    load_yaml,
    parse_override,
)
from ossnet_pipelines.jobrunner import OverrideFlag, add_config_arguments, overrides_from_args
from ossnet_pipelines.train.cli import configure_train_parser, job_from_args
from ossnet_pipelines.train.job import TrainJob, load_train_job

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def job(**overrides: object) -> TrainJob:
    return load_job(TrainJob, None, [("store", "/data/s.zarr"), *overrides.items()])


# --------------------------------------------------------------------------- shipped configs


def test_brats_config_has_the_paper_settings() -> None:
    j = load_train_job(CONFIGS / "brats2020.yaml")
    assert (j.model.variant, j.model.preset) == ("C", "brats")
    assert j.sampling == SamplingConfig(n_points=2**14, border_ratio=0.0, band_width=6)
    assert (j.train.batch_size, j.train.epochs, j.train.milestones, j.train.gamma) == (8, 50, (20, 30), 0.1)
    assert j.train.lr == pytest.approx(3e-4) and j.train.alpha == pytest.approx(0.1)
    assert j.train.optimizer == "radam_lookahead" and j.scaling.use_gpu and j.train.mixed_precision
    assert j.model.build(in_channels=4).volume_shape == (256, 256, 160)


def test_lits_config_uses_border_sampling_and_batch_4() -> None:
    j = load_train_job(CONFIGS / "lits.yaml")
    assert (j.model.preset, j.train.batch_size, j.sampling.border_ratio) == ("lits", 4, 0.5)
    assert j.model.build(in_channels=1).volume_shape == (512, 512, 512)


def test_quickstart_config_is_a_small_cpu_job_under_the_state_dir() -> None:
    j = load_train_job(CONFIGS / "quickstart.yaml")
    assert j.store.startswith(".ossnet/") and not j.scaling.use_gpu
    assert j.model.preset in ("tiny", "small") and j.train.epochs <= 30
    # The recipe that trains on the hard phantoms: no decoder batch statistics, a late LR drop.
    assert j.model.cbn_norm == "layer" and j.train.milestones[0] >= j.train.epochs // 2


# --------------------------------------------------------------------------- errors name the field


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (("train.epochs", 0), "train.epochs: must be >= 1, got 0"),
        (("train.epochs", "abc"), "train.epochs: expected an integer, got 'abc'"),
        (("train.epochs", 2.5), "train.epochs: expected an integer, got 2.5"),
        (("train.lr", -1.0), "train.lr: must be > 0.0, got -1.0"),
        (("train.gamma", 1.5), "train.gamma: must be <= 1.0, got 1.5"),
        (("train.milestones", [30, 20]), "train.milestones: must be strictly increasing, got [30, 20]"),
        (("train.milestones", 20), "train.milestones: expected a list, got 20"),
        (("train.optimizer", "sgd"), "train.optimizer: must be one of 'radam_lookahead', 'radam' or 'adam', got 'sgd'"),
        (("train.mixed_precision", "maybe"), "train.mixed_precision: expected true or false, got 'maybe'"),
        (("model.variant", "E"), "model.variant: must be one of 'onet', 'A', 'B', 'C' or 'D', got 'E'"),
        (("model.patch_size", 4), "model.patch_size: must be an odd integer >= 1, got 4"),
        (("model.volume_shape", [32, 32]), "model.volume_shape: too few items: item [2] is missing"),
        (("model.volume_shape", [32, 1, 32]), "model.volume_shape[1]: must be >= 2, got 1"),
        (("train.milestones", [0, 5]), "train.milestones[0]: must be >= 1, got 0"),
        (("train.lr", float("nan")), "train.lr: must be finite, got nan"),
        (("store", " "), "store: must not be empty"),
        (("sampling.n_points", 0), "sampling.n_points: must be >= 1, got 0"),
        (("sampling.bogus", 1), "sampling.bogus: unknown field; expected one of: n_points, border_ratio, band_width"),
        (("sampling.border_ratio", 1.5), "sampling.border_ratio: must be in [0, 1], got 1.5"),
        (("augment.p_noise", -0.1), "augment.p_noise: must be in [0, 1], got -0.1"),
        (("scaling.num_workers", -1), "scaling.num_workers: must be >= 0, got -1"),
        (("scaling.resources_per_worker", {"CPU": 0}), "scaling.resources_per_worker.CPU: must be > 0, got 0.0"),
        (("scaling.resources_per_worker", {"CPU": "x"}), "scaling.resources_per_worker.CPU: expected a number, got 'x'"),
        (("run.name", "../escape"), "run.name: '../escape' must be 1-128 letters"),
        (("validation.mode", "fast"), "validation.mode: must be one of 'dense', 'mise' or 'mise_lowres', got 'fast'"),
        (("tracking.experiment", " "), "tracking.experiment: must not be empty"),
        (("train.bogus", 1), "train.bogus: unknown field; expected one of: epochs,"),
        (("bogus", 1), "bogus: unknown field; expected one of: store, model,"),
    ],
)
def test_bad_values_give_one_error_naming_the_field(override: tuple[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        job(**{override[0]: override[1]})
    assert str(info.value).startswith(message), str(info.value)


def test_missing_store_and_cross_field_rules() -> None:
    with pytest.raises(ConfigError, match=r"^store: required field is missing$"):
        load_job(TrainJob, None, [])
    with pytest.raises(ConfigError, match=r"^train.batch_size: must be a multiple of scaling.num_workers \(3\), got 8$"):
        job(**{"scaling.num_workers": 3})
    # num_workers 0 (in-process) counts as one worker
    assert job(**{"scaling.num_workers": 0, "train.batch_size": 3}).per_worker_batch == 3
    assert job(**{"scaling.num_workers": 4, "train.batch_size": 8}).per_worker_batch == 2


def test_yaml_file_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: [1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML \(line \d+\)"):
        load_yaml(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"list.yaml: the top level must be a mapping"):
        load_yaml(listing)
    with pytest.raises(ConfigError, match=r"missing.yaml: cannot read the config file"):
        load_yaml(tmp_path / "missing.yaml")
    section = tmp_path / "section.yaml"
    section.write_text("store: s.zarr\ntrain: 5\n")
    with pytest.raises(ConfigError, match=r"^train: expected a mapping, got 5$"):
        load_train_job(section)


# --------------------------------------------------------------------------- overrides


def test_override_values_are_read_as_yaml() -> None:
    assert parse_override("train.epochs=3") == ("train.epochs", 3)
    assert parse_override("train.milestones=[5, 9]") == ("train.milestones", [5, 9])
    assert parse_override("run.name=null") == ("run.name", None)
    assert parse_override("tracking.uri=http://127.0.0.1:5000") == ("tracking.uri", "http://127.0.0.1:5000")
    for bad in ("train.epochs", "=3", "train..epochs=3"):
        with pytest.raises(ConfigError, match="expected KEY=VALUE"):
            parse_override(bad)


def test_overrides_apply_after_the_file_and_coerce_types(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("store: s.zarr\ntrain:\n  epochs: 5\n  lr: 1.0e-3\nscaling:\n  resources_per_worker: null\n")
    j = load_train_job(path, ["train.epochs=7", "train.lr=3e-4", "train.milestones=[2, 4]",
                              "scaling.resources_per_worker.CPU=0.5"])
    assert j.train.epochs == 7
    assert j.train.lr == pytest.approx(3e-4)  # "3e-4" is a YAML 1.1 string: coerced to a float
    assert j.train.milestones == (2, 4)
    assert j.scaling.resources_per_worker == {"CPU": 0.5}
    assert j.scaling.worker_resources() == {"CPU": 0.5}
    with pytest.raises(ConfigError, match=r"^train.epochs: is a value, so train.epochs.x cannot be set$"):
        apply_overrides({"train": {"epochs": 1}}, ["train.epochs.x=2"])


def test_gpu_workers_get_a_gpu_by_default() -> None:
    assert job(**{"scaling.use_gpu": True}).scaling.worker_resources() == {"CPU": 1.0, "GPU": 1.0}
    custom = job(**{"scaling.use_gpu": True, "scaling.resources_per_worker": {"CPU": 4, "GPU": 0.5}})
    assert custom.scaling.worker_resources() == {"CPU": 4.0, "GPU": 0.5}


def test_train_cli_flags_map_onto_config_keys(tmp_path: Path) -> None:
    parser = configure_train_parser(argparse.ArgumentParser())
    args = parser.parse_args([
        "--config", str(CONFIGS / "quickstart.yaml"), "--epochs", "3", "--num-workers", "2", "--use-gpu",
        "--cpus-per-worker", "0.5", "--no-mlflow", "--variant", "D", "--set", "train.lr=0.01", "--name", "exp-1",
    ])
    j = job_from_args(args)
    assert (j.train.epochs, j.scaling.num_workers, j.scaling.use_gpu, j.model.variant) == (3, 2, True, "D")
    assert j.scaling.resources_per_worker == {"CPU": 0.5}
    assert j.tracking.enabled is False and j.train.lr == pytest.approx(0.01) and j.run_name == "exp-1"
    args = parser.parse_args(["--config", str(CONFIGS / "quickstart.yaml"), "--no-use-gpu", "--epochs", "0"])
    with pytest.raises(ConfigError, match=r"^train.epochs: must be >= 1, got 0$"):
        job_from_args(args)
    with pytest.raises(SystemExit):  # strict parsing: unknown flags are errors
        parser.parse_args(["--epoch", "3"])


def test_config_json_round_trips_the_whole_job() -> None:
    import json

    original = load_train_job(CONFIGS / "brats2020.yaml", ["train.epochs=3"]).resolved()
    parser = configure_train_parser(argparse.ArgumentParser())
    again = job_from_args(parser.parse_args(["--config-json", json.dumps(original.to_dict())]))
    assert again == original and again.run_name == original.run_name


def test_config_sources_are_exclusive_and_bad_json_is_named() -> None:
    parser = configure_train_parser(argparse.ArgumentParser())
    both = parser.parse_args(["--config", str(CONFIGS / "quickstart.yaml"), "--config-json", "{}"])
    with pytest.raises(ConfigError, match=r"^--config and --config-json are mutually exclusive$"):
        job_from_args(both)
    with pytest.raises(ConfigError, match=r"^--config-json: not valid JSON"):
        job_from_args(parser.parse_args(["--config-json", "{store: x"]))
    # Overrides apply on top of the JSON source too.
    j = job_from_args(parser.parse_args(["--config-json", '{"store": "s.zarr", "train": {"epochs": 4}}', "--epochs", "6"]))
    assert (j.store, j.train.epochs) == ("s.zarr", 6)


# --------------------------------------------------------------------------- run names


def test_default_run_name_is_stable_and_ignores_epochs_and_scaling() -> None:
    base = job()
    assert base.run_name == job().run_name
    assert base.run_name.startswith("brats-C-")
    same = [{"train.epochs": 3}, {"scaling.num_workers": 2}, {"tracking.enabled": False},
            {"train.validate_every": 4}, {"validation.max_cases": 2}, {"run.storage_path": "/elsewhere"}]
    for change in same:
        assert job(**change).run_name == base.run_name, change
    different = [{"train.lr": 1e-3}, {"sampling.n_points": 1024}, {"model.variant": "D"},
                 {"store": "/data/other.zarr"}, {"train.seed": 1}, {"augment.p_flip": 0.0}]
    for change in different:
        assert job(**change).run_name != base.run_name, change
    assert job(**{"run.name": "mine"}).run_name == "mine"


def test_resolved_job_has_absolute_paths_and_a_fixed_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    j = load_job(TrainJob, None, [("store", "stores/s.zarr")])
    r = j.resolved()
    assert r.store == str(tmp_path / "stores/s.zarr")
    assert r.run.storage_path == str(tmp_path / ".ossnet/ray_results")
    assert r.run.name == r.run_name and r.run_name.startswith("brats-C-")
    assert load_job(TrainJob, None, [("store", "s3://bucket/s.zarr")]).resolved().store == "s3://bucket/s.zarr"
    assert r.resolved() == r


# --------------------------------------------------------------------------- generic models


class _Inner(JobModel):
    size: int = Field(3, ge=1)
    shape: tuple[int, int, int] = (1, 2, 3)


class _Outer(Job):
    mode: Literal["a", "b"] = "a"
    weights: dict[str, float] = Field(default_factory=dict)
    maybe: Optional[float] = None
    inner: _Inner = Field(default_factory=_Inner)
    sampling: Checked[SamplingConfig] = Field(default_factory=SamplingConfig)

    @model_validator(mode="after")
    def _rule(self) -> "_Outer":
        if self.mode == "b" and self.maybe is None:
            raise ConfigError("maybe: required with mode b")
        return self


def test_any_job_model_names_nested_fields_and_checks_plain_sections() -> None:
    out = _Outer.parse({"mode": "b", "weights": {"x": 1}, "maybe": 2, "inner": {"shape": [4, 5, 6]}})
    assert out == _Outer(mode="b", weights={"x": 1.0}, maybe=2.0, inner=_Inner(shape=(4, 5, 6)))
    assert isinstance(out.inner.shape, tuple) and out.to_dict()["inner"]["shape"] == [4, 5, 6]
    with pytest.raises(ConfigError, match=r"^mode: must be one of 'a' or 'b', got 'c'$"):
        _Outer.parse({"mode": "c"})
    with pytest.raises(ConfigError, match=r"^inner.size: must be >= 1, got 0$"):
        _Outer.parse({"inner": {"size": 0}})
    with pytest.raises(ConfigError, match=r"^inner.shape\[1\]: expected an integer, got 'x'$"):
        _Outer(inner={"shape": [1, "x", 3]})
    with pytest.raises(ConfigError, match=r"^maybe: required with mode b$"):
        _Outer(mode="b")
    # An ossnet.config dataclass as a section: pydantic checks its types, then its validate() runs.
    with pytest.raises(ConfigError, match=r"^sampling.border_ratio: must be in \[0, 1\], got 1.5$"):
        _Outer.parse({"sampling": {"border_ratio": 1.5}})
    with pytest.raises(ConfigError, match=r"^expected a mapping of sections, got list$"):
        _Outer.parse([1])  # type: ignore[arg-type]


def test_updated_sets_dotted_keys_and_validates_the_whole_job_again() -> None:
    base = job()
    trial = base.updated({"train.alpha": 0.3, "sampling.border_ratio": 0.5, "run.name": "trial-1"})
    assert (trial.train.alpha, trial.sampling.border_ratio, trial.run_name) == (0.3, 0.5, "trial-1")
    assert (base.train.alpha, base.sampling.border_ratio) == (0.1, 0.0)  # frozen: the original is unchanged
    with pytest.raises(ConfigError, match=r"^train.epochs: must be >= 1, got 0$"):
        base.updated({"train.epochs": 0})
    with pytest.raises(ConfigError, match=r"^train.batch_size: must be a multiple of scaling.num_workers \(3\)"):
        base.updated({"scaling.num_workers": 3})  # a cross-field rule sees the new value
    with pytest.raises(ConfigError, match=r"^train.epoch: unknown field$"):
        base.updated({"train.epoch": 3})
    with pytest.raises(ValueError, match="frozen"):
        base.model_copy().__setattr__("store", "x")


def test_dump_and_reparse_is_identity_and_hash_excludes_keys() -> None:
    import yaml

    original = load_train_job(CONFIGS / "lits.yaml")
    assert TrainJob.parse(yaml.safe_load(dump_yaml(original))) == original
    a, b = job(), job(**{"train.epochs": 9})
    assert config_hash(a) != config_hash(b)
    assert config_hash(a, ["train.epochs"]) == config_hash(b, ["train.epochs"])


def test_override_flags_helpers() -> None:
    flags = (OverrideFlag("--n", "a.n", int), OverrideFlag("--fast", "a.fast", bool),
             OverrideFlag("--off", "a.on", const=False))
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, flags)
    args = parser.parse_args(["--set", "a.x=1", "--n", "4", "--no-fast", "--off"])
    assert overrides_from_args(args, flags) == [("a.x", 1), ("a.n", 4), ("a.fast", False), ("a.on", False)]
    assert overrides_from_args(parser.parse_args([]), flags) == []


def test_multi_target_configs_name_their_target_maps() -> None:
    from ossnet.targets import TARGET_PRESETS

    regions = load_train_job(CONFIGS / "brats2020-regions.yaml")
    assert regions.model.targets == "brats-regions" and regions.model.build(in_channels=4).targets.n_outputs == 3
    assert regions.sampling.border_ratio > 0  # each region gets its share of border points
    lits = load_train_job(CONFIGS / "lits-tumour.yaml")
    spec = TARGET_PRESETS[lits.model.targets]
    assert spec.kind == "classes" and len(lits.train.target_weights) == spec.n_outputs
    assert lits.tracking.model_name != load_train_job(CONFIGS / "lits.yaml").tracking.model_name
    with pytest.raises(ConfigError, match=r"^model.targets: must be one of 'binary'"):
        job(**{"model.targets": "brats"})
