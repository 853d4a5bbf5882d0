"""Kill -9 campaign: every writing command of knnlm killed with SIGKILL at seeded random
moments, then checked and run again (tests/kill.py says what is checked).

A tiny random llama and a corpus of a few sentences (tests/tiny.py: no download).  For each
command an uninterrupted run gives its wall time T and its output's fingerprint; then each
kill point starts the command on a fresh copy of the inputs and kills its process group
after a delay drawn (seeded) uniformly from [0, 1.1 T] for half the points and from
[0.6 T, 1.05 T] (the end of the run: writing and publishing) for the other half.

    python benchmarks/bench_kill.py                       # 200+ points, ~25 min on 2 CPU cores
    python benchmarks/bench_kill.py --points 4 --commands build index

Results: benchmarks/results/reliability.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import ROOT, run_main, setup_logging

sys.path.insert(0, str(ROOT / "tests"))
from kill import COMMANDS, Workspace  # noqa: E402
from tiny import make_model_dir  # noqa: E402

LOG = logging.getLogger("bench")
POINTS = {"build": 30, "build --workers": 10, "index": 25, "index --workers": 10, "shard": 25, "reduce": 25,
          "memory targets": 25, "memory train": 25, "remove": 20, "add": 25, "compact": 25}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--points", type=int, default=None, help="kill points per command (default: 10 to 30 each, 240)")
    ap.add_argument("--commands", nargs="*", default=list(COMMANDS), choices=list(COMMANDS), metavar="COMMAND")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    setup_logging("bench")
    rng = np.random.default_rng(args.seed)
    rows, problems = [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        w = Workspace.create(root, make_model_dir("llama", root / "model"))
        for name in args.commands:
            cmd = COMMANDS[name]
            t_ref, ref = w.reference(cmd)
            n = args.points or POINTS[name]
            delays = np.concatenate([rng.uniform(0, 1.1 * t_ref, n - n // 2),
                                     rng.uniform(0.6 * t_ref, 1.05 * t_ref, n // 2)])
            t0, killed, bad = time.perf_counter(), 0, 0
            for i, d in enumerate(delays):
                o = w.kill_point(cmd, ref, float(d), tag=f"{name.replace(' ', '_')}-{i}")
                killed += o.killed
                if o.problems:
                    bad += 1
                    problems += [f"{name} killed at {d:.2f}s: {p}" for p in o.problems]
            LOG.info("%s: %d points, %d killed mid-run, %d with problems", name, n, killed, bad)
            rows.append((name, t_ref, n, killed, bad, time.perf_counter() - t0))
    print("| command | uninterrupted run (s) | kill points | killed before it finished | "
          "with a problem | rerun equal to the uninterrupted run | campaign (s) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, t_ref, n, killed, bad, secs in rows:
        print(f"| {name} | {t_ref:.1f} | {n} | {killed} | {bad} | {n - bad}/{n} | {secs:.0f} |")
    total = sum(r[2] for r in rows)
    print(f"\n{total} kill points, {sum(r[3] for r in rows)} killed mid-run, {len(problems)} problems")
    for p in problems[:40]:
        print("problem:", p[:500])
    if problems:
        sys.exit(1)


if __name__ == "__main__":
    run_main(main)
