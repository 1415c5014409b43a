"""Hyperparameter sweeps: Ray Tune + Optuna + ASHA over OSS-Net training runs.

Modules:
    space: the search space (YAML -> validated dataclasses), its Optuna define-by-run form and
        the mapping of sampled settings onto ``TrainJob`` overrides.
    job: ``TuneJob`` (a training config plus ``space``/``sweep``/``scheduler``), its parsing
        and validation.
    trial: one trial = a Ray Train driver (``ossnet_pipelines.train.train``) reporting to Tune.
    scheduler: ASHA whose rungs survive ``Tuner.restore``.
    sweep: ``run_sweep(job) -> SweepResult`` (Tuner, resume, MLflow parent run, registration).
    summary: the summary table and the choice of the best trial (pure functions).
    tracking: MLflow parent/child runs and the best model's registration.
    cli: ``ossnet tune``.

Importing this package does not import Ray, MLflow or torch.
"""
