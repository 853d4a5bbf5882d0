"""Kill -9 at random moments: each writing command of knnlm run as a subprocess, killed with
SIGKILL after a seeded random delay spread over its whole run (publishing included), then
checked and run again.

    w = Workspace.create(root, model_dir)          # a corpus, a datastore, targets: the inputs
    ref = w.reference(COMMANDS["index"])           # an uninterrupted run: time and fingerprint
    r = w.kill_point(COMMANDS["index"], ref, delay) # kill after `delay` s, check, rerun, compare
    assert not r.problems

After the kill, every datastore, index and decoder directory that exists must pass
`knnlm info --verify` (the complete old one or the complete new one: never a part of
either, never a `.partial` under a final name); running the same command again must
finish (or say that its work is done: DONE, if the kill came after the command had done
it), and
its output must equal the uninterrupted run's, bit for bit (the fingerprint: every file's
bytes, metadata without its ids, timestamps and timings).  Used by tests/test_kill.py
(a few points per command) and benchmarks/bench_kill.py (the full campaign).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tiny import TEXT

# metadata that differs between two identical runs: ids, clocks, and what names them
VOLATILE = {"id", "created", "build_seconds", "train_seconds", "datastore_id", "shards", "meta_sha256",
            "sharded", "seconds", "elapsed", "minutes", "knnlm_version", "sha256", "removed_at", "time",
            "wall_seconds", "tokens_per_second", "tuned", "when"}


# what a rerun says when the killed run had already done its work
DONE = ("already exists", "already removed", "nothing to compact", "already added")


@dataclass
class Command:
    name: str
    argv: list[str]  # after `knnlm -q`; {ds} {out} {targets} {model} are filled in
    outputs: list[str]  # directories it writes (relative to the workspace)
    ray: bool = False  # starts a local Ray (slow to start: fewer points)


MODEL = ["--model", "{model}", "--dtype", "float32", "--device", "cpu"]
WIN = ["--window", "32", "--stride", "16", "--batch-tokens", "64"]
COMMANDS = {c.name: c for c in [
    Command("build", ["build", "{corpus}", "-o", "{out}", "--index", "Flat", "--tune-tokens", "200", *MODEL, *WIN],
            ["out"]),
    Command("build --workers", ["build", "{corpus}", "-o", "{out}", "--workers", "2", "--index", "Flat", "--no-tune",
                                *MODEL, *WIN], ["out"], ray=True),
    Command("index", ["index", "{ds}", "--type", "IVF4,Flat", "--name", "ivf", "--train-size", "200"], ["ds"]),
    Command("index --workers", ["index", "{sharded}", "--type", "IVF4,Flat", "--name", "ivf", "--workers", "2",
                                "--train-size", "200"], ["sharded"], ray=True),
    Command("shard", ["shard", "{ds}", "-o", "{out}", "--shards", "3"], ["out", "ds"]),
    Command("reduce", ["reduce", "{ds}", "-o", "{out}", "--pca", "8", "--index", "Flat"], ["out", "ds"]),
    Command("memory targets", ["memory", "targets", "{ds}", "-o", "{out}", "-k", "8", "--keep", "8"], ["out"]),
    Command("memory train", ["memory", "train", "{ds}", "--targets", "{targets}", "-o", "{out}", "--layers", "1",
                             "--max-steps", "12", "--batch-size", "2", "--seq-len", "32", "--eval-every", "4",
                             "--save-every", "4", *MODEL], ["out"]),
    Command("remove", ["remove", "{ds}", "--doc", "2"], ["ds"]),
    Command("add", ["add", "{ds}", "{more}", *MODEL, "--batch-tokens", "64"], ["ds"]),
    Command("compact", ["compact", "{removed}"], ["removed"]),
]}


@dataclass
class Outcome:
    delay: float
    killed: bool  # False: it had finished before the kill
    problems: list[str] = field(default_factory=list)


class Workspace:
    """The inputs every command reads, made once; each run works on a fresh copy."""

    def __init__(self, root: Path, model: Path):
        self.root, self.model = root, model
        self.base = root / "base"

    @classmethod
    def create(cls, root: Path, model: Path) -> "Workspace":
        w = cls(root, model)
        b = w.base
        b.mkdir(parents=True, exist_ok=True)
        docs = [s.strip() + "." for s in TEXT.split(".") if s.strip()]
        (b / "corpus.jsonl").write_text("".join(json.dumps({"title": f"d{i}", "text": d}) + "\n"
                                                for i, d in enumerate(docs)))
        (b / "more.jsonl").write_text("".join(json.dumps({"title": f"m{i}", "text": d}) + "\n"
                                              for i, d in enumerate(reversed(docs[:6]))))  # for `add`
        w.knnlm(["build", str(b / "corpus.jsonl"), "-o", str(b / "ds"), "--index", "Flat", "--no-tune",
                 *w.fill(MODEL), *WIN], check=True)
        w.knnlm(["shard", str(b / "ds"), "-o", str(b / "sharded"), "--shards", "2"], check=True)
        w.knnlm(["memory", "targets", str(b / "ds"), "-o", str(b / "targets"), "-k", "8", "--keep", "8"], check=True)
        shutil.copytree(b / "ds", b / "removed")
        w.knnlm(["remove", str(b / "removed"), "--doc", "1"], check=True)
        return w

    def fill(self, argv: list[str], run: Path | None = None) -> list[str]:
        run = run or self.base
        names = {"model": self.model, "corpus": run / "corpus.jsonl", "more": run / "more.jsonl", "ds": run / "ds", "out": run / "out",
                 "targets": run / "targets", "sharded": run / "sharded", "removed": run / "removed"}
        return [a.format(**{k: str(v) for k, v in names.items()}) for a in argv]

    def knnlm(self, argv: list[str], check: bool = False, **kw) -> subprocess.CompletedProcess:
        r = subprocess.run([sys.executable, "-m", "knnlm", "-q", *argv], capture_output=True, text=True, **kw)
        if check and r.returncode != 0:
            raise RuntimeError(f"knnlm {' '.join(argv)} failed: {r.stderr.strip()[-500:]}")
        return r

    def fresh(self, name: str) -> Path:
        run = self.root / "runs" / name
        if run.exists():
            shutil.rmtree(run)
        shutil.copytree(self.base, run, symlinks=True)
        return run

    # ---- checks -----------------------------------------------------------------------
    def artifacts(self, run: Path) -> list[Path]:
        """Every datastore, sharded datastore or decoder directory under the run."""
        found = []
        for marker in ("meta.json", "manifest.json", "memory.json"):
            for f in run.rglob(marker):
                d = f.parent
                if any(p.name.endswith((".partial", ".saving", ".old")) for p in [d, *d.parents]):
                    continue
                if marker == "meta.json" and (d.parent.name == "shards" or not (d / "keys.npy").exists()):
                    continue  # a shard (checked through its manifest), or memory targets (no checksums)
                found.append(d)
        return sorted(found)

    def verify(self, run: Path) -> list[str]:
        problems = []
        for d in self.artifacts(run):
            r = self.knnlm(["info", str(d), "--verify"])
            if r.returncode != 0:
                problems.append(f"{d.relative_to(run)}: info --verify failed: {r.stderr.strip()[-300:]}")
            elif (d / "progress.json").exists():
                problems.append(f"{d.relative_to(run)}: an unfinished build under its final name")
        return problems

    def fingerprint(self, run: Path, cmd: Command) -> dict:
        out = {}
        for rel in cmd.outputs:
            d = run / rel
            if not d.exists():
                out[rel] = None
                continue
            for f in sorted(p for p in d.rglob("*") if p.is_file()):
                key = str(f.relative_to(run))
                if f.suffix == ".json":
                    try:
                        out[key] = _stable(json.loads(f.read_text().replace(str(run), "RUN")))  # (its own paths)
                    except ValueError:
                        out[key] = "unreadable json"
                elif f.suffix not in (".log", ".lock"):
                    out[key] = hashlib.sha256(f.read_bytes()).hexdigest()
        return out

    # ---- runs -------------------------------------------------------------------------
    def reference(self, cmd: Command) -> tuple[float, dict]:
        """An uninterrupted run: its wall time and its output's fingerprint."""
        run = self.fresh("reference")
        t = time.perf_counter()
        self.knnlm(self.fill(cmd.argv, run), check=True)
        return time.perf_counter() - t, self.fingerprint(run, cmd)

    def kill_point(self, cmd: Command, reference: dict, delay: float, tag: str = "k") -> Outcome:
        run = self.fresh(tag)
        p = subprocess.Popen([sys.executable, "-m", "knnlm", "-q", *self.fill(cmd.argv, run)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        try:
            p.wait(timeout=delay)
            killed = False
        except subprocess.TimeoutExpired:
            _kill_tree(p.pid)  # the command and every process it started (Ray's among them)
            p.wait()
            killed = True
        o = Outcome(delay, killed)
        o.problems += self.verify(run)
        r = self.knnlm(self.fill(cmd.argv, run))
        if r.returncode != 0 and not any(m in r.stderr for m in DONE):
            o.problems.append(f"the rerun failed: {r.stderr.strip()[-400:]}")
        o.problems += self.verify(run)
        got = self.fingerprint(run, cmd)
        if got != reference:
            diff = [f"{k} ({'missing' if k not in got else 'extra' if k not in reference else 'differs'})"
                    for k in sorted(set(got) | set(reference)) if got.get(k) != reference.get(k)]
            o.problems.append(f"the rerun's output differs from an uninterrupted run's: {', '.join(diff[:6])}"
                              + (f" (rerun said: {r.stderr.strip()[-200:]})" if r.returncode else ""))
        if not o.problems:
            shutil.rmtree(run)
        return o


def _kill_tree(pid: int) -> None:
    import psutil

    try:
        tree = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    os.killpg(pid, signal.SIGKILL)
    for child in tree:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


def _stable(obj):
    """JSON without the fields that differ between identical runs."""
    if isinstance(obj, dict):
        return {k: _stable(v) for k, v in sorted(obj.items()) if k not in VOLATILE}
    if isinstance(obj, list):
        return [_stable(v) for v in obj]
    return obj
