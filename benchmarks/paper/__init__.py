"""The kNN-LM paper's experiments (run by benchmarks/paper_experiments.py): one module per
experiment, each with its computation (`compute(run)`), its claim and verdict, its section
of docs/results.md and its plot; `runner` computes and caches what they share, `sweeps`
tunes k/T/lambda from one retrieval, `page` writes the page."""

from . import cache, frequency, interpolation, k, keypoint, precision, size, temperature

EXPERIMENTS = {"size": size, "k": k, "lambda": interpolation, "keypoint": keypoint, "precision": precision,
               "cache": cache, "temperature": temperature, "frequency": frequency}  # the page's order
RUN_ORDER = ("k", "temperature", "cache", "frequency", "lambda", "precision", "keypoint", "size")  # cheapest first
