"""Benchmarks that measure OSS-Net against its baselines side by side in one run.

Each benchmark is a module run as ``python -m ossnet_bench.<name> [--quick]``; it prints progress to
stderr and, as the last line on stdout, one JSON object with its figures.
"""
