"""Hyperparameter sweeps: Ray Tune + Optuna + ASHA over OSS-Net training runs."""
