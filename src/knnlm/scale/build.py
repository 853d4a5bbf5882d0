"""Distributed datastore build: the corpus split by documents over N Ray workers.

Each worker is a Ray actor with its own model replica that builds one shard with
today's `build_datastore` (documents a..b-1 of the corpora): streaming, resumable from
its own `.partial/`, published by rename.  The manifest is written last and the whole
directory published by rename, so a reader never sees half a sharded datastore.  A
worker killed mid-build is restarted by Ray (max_restarts) and its task retried; the
shard resumes from its last flushed batch.

Shard boundaries fall where the single-process build starts a new batch at a new
document, so every shard runs exactly the batches the single build would: 1 and N
workers give the same keys bit for bit on CPU, the same values and provenance, in
the manifest's order.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from knnlm.core.batching import WindowSettings, make_plan
from knnlm.core.corpus import corpus_record, read_documents
from knnlm.core.datastore import BuildSettings, Datastore, build_datastore, publish, write_json_atomic
from knnlm.errors import KnnlmError
from knnlm.scale.manifest import write_manifest

LOG = logging.getLogger(__name__)


def shard_ranges(encode, corpora: Sequence[Path], workers: int, window: int, stride: int,
                 batch_tokens: int) -> list[tuple[int, int]]:
    """Document ranges [a, b) (reading order, as `build_datastore(documents=...)` takes
    them) of at most `workers` shards with nearly equal entries, each starting where the
    single build starts a batch with a new document."""
    docs = [d for p in corpora for d in read_documents(p)]
    ids = [encode(d.text) for d in docs]
    it = iter(ids)
    plan = make_plan(lambda _text: next(it), docs, window, stride, batch_tokens)  # the single build's plan
    kept = [i for i, t in enumerate(ids) if len(t) >= 2]  # plan document -> reading-order document
    first_window = {}
    for w, (d, _) in enumerate(plan.windows):
        first_window.setdefault(d, w)
    batch_starts = {lo for lo, _ in plan.batches}
    candidates = np.array([d for d in range(1, len(kept)) if first_window[d] in batch_starts], dtype=np.int64)
    cuts: list[int] = []
    for s in range(1, min(workers, len(candidates) + 1)):
        left = candidates[candidates > (cuts[-1] if cuts else 0)]
        left = left[: len(left) - (min(workers, len(candidates) + 1) - 1 - s)]  # room for the cuts after
        target = s * plan.count / workers
        cuts.append(int(left[np.argmin(np.abs(plan.docs[left, 2] - target))]))
    if len(cuts) + 1 < workers:
        LOG.warning("only %d shard boundaries fall on a batch and document start: %d shards, not %d",
                    len(cuts), len(cuts) + 1, workers)
    starts = [0] + [kept[c] for c in cuts]
    return [(a, b) for a, b in zip(starts, starts[1:] + [len(docs)])]


class ShardBuilder:
    """A Ray actor's body: one model replica that builds shards."""

    def __init__(self, model: str, dtype: str, device: str, key_point: str, threads: int | None = None):
        import torch

        from knnlm.core.model import LM

        if threads:
            torch.set_num_threads(threads)
        self.lm = LM.load(model, dtype=dtype, device=device, key_point=key_point)

    def build(self, corpora: list[str], out: str, documents: tuple[int, int], window: int, stride: int,
              batch_tokens: int, shard: int, on_batch: Callable[[int, int], None] | None = None) -> int:
        if (Path(out) / "meta.json").exists():  # published by an earlier attempt
            return Datastore(out).count
        hook = (lambda b: on_batch(shard, b)) if on_batch is not None else None
        settings = BuildSettings(WindowSettings(window, stride, batch_tokens), documents=tuple(documents))
        build_datastore(self.lm, corpora, out, settings, progress=False, on_batch=hook)
        return Datastore(out).count

    def pid(self) -> int:
        return os.getpid()


def build_sharded(lm, corpora: Sequence[str | Path], out: str | Path, workers: int, window: int = 1024,
                  stride: int = 512, batch_tokens: int = 4096, overwrite: bool = False,
                  ray_address: str | None = None, device: str = "cpu", retries: int = 3,
                  on_batch: Callable[[int, int], None] | None = None) -> Path:
    """Build a sharded datastore over `workers` Ray actors; returns its path.

    `lm` (loaded here) plans the split; each actor loads its own replica of the same model
    (`lm.name`, dtype, key point).  Run again after a crash: finished shards are kept and
    unfinished ones resume.  `on_batch(shard, batch)` runs in the worker after each
    flushed batch (fault-injection tests).
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise KnnlmError(f"{out} already exists (use --overwrite to replace it)")
    if workers < 1:
        raise KnnlmError(f"--workers must be at least 1, got {workers}")
    corpora = [Path(c).resolve() for c in corpora]
    if not corpora:
        raise KnnlmError("no corpus file given")
    if lm.max_positions and window > lm.max_positions:
        raise KnnlmError(f"window {window} is longer than the model's {lm.max_positions} positions")
    ranges = shard_ranges(lm.encode, corpora, workers, window, stride, batch_tokens)
    model = str(Path(lm.name).resolve()) if Path(lm.name).exists() else lm.name
    dtype = str(lm.dtype).replace("torch.", "")
    job = {"corpora": [corpus_record(c) for c in corpora], "ranges": [list(r) for r in ranges], "window": window,
           "stride": stride, "batch_tokens": batch_tokens, "identity": lm.identity(), "dtype": dtype}
    partial = out.with_name(out.name + ".partial")
    job_file = partial / "job.json"
    if partial.exists():
        try:
            same = json.loads(job_file.read_text()) == json.loads(json.dumps(job))
        except (OSError, ValueError):
            same = False
        if not same:
            LOG.warning("starting over: the unfinished build in %s had other input or settings", partial)
            shutil.rmtree(partial)
        else:
            LOG.warning("resuming the sharded build in %s", partial)
    (partial / "shards").mkdir(parents=True, exist_ok=True)
    write_json_atomic(job_file, job)
    paths = [partial / "shards" / f"{s:05d}" for s in range(len(ranges))]
    from knnlm.scale.cluster import session

    local = not ray_address
    cpus = os.cpu_count() or 1
    with session(ray_address, num_cpus=max(cpus, len(ranges)) if local else None) as ray:
        from ray.exceptions import RayActorError, RayTaskError

        gpu = {"num_gpus": 1} if device.startswith("cuda") else {}
        per = min(1.0, float(ray.cluster_resources().get("CPU", 1)) / len(ranges))  # all workers start at once
        actor = ray.remote(num_cpus=per, max_restarts=retries, max_task_retries=retries, **gpu)(ShardBuilder)
        threads = max(1, cpus // len(ranges)) if local else None
        actors = [actor.remote(model, dtype, device, lm.key_point, threads) for _ in ranges]
        refs = [a.build.remote([str(c) for c in corpora], str(p), r, window, stride, batch_tokens, s, on_batch)
                for s, (a, p, r) in enumerate(zip(actors, paths, ranges))]
        try:
            counts = ray.get(refs)
        except RayActorError as e:
            raise KnnlmError(f"a build worker died {retries + 1} times ({type(e).__name__}); the finished and "
                             f"partial shards are kept in {partial}: run the same command to resume") from None
        except RayTaskError as e:
            if isinstance(e.cause, KnnlmError):
                raise KnnlmError(str(e.cause)) from None
            raise
        finally:
            for a in actors:
                ray.kill(a, no_restart=True)
    LOG.info("shards built: %s entries", ", ".join(str(c) for c in counts))
    write_manifest(partial, paths, extra={"build": {"workers": len(ranges), "documents": job["ranges"]}})
    job_file.unlink()
    publish(partial, out)
    return out
