"""The index made during a datastore build (knnlm.core.index_fill.IndexFiller): trained on the
build's first keys once they are on disk, filled batch by batch, published with the
datastore; the same neighbours as that index built afterwards, and the same after a kill."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import knnlm.core.index
from knnlm.cli.main import main
from knnlm.core.batching import WindowSettings
from knnlm.core.datastore import BuildSettings, Datastore, build_datastore
from knnlm.core.index import Searcher, build_index, list_indexes, train_index
from knnlm.core.index_fill import IndexSettings
from knnlm.errors import KnnlmError

FACTORY, NAME = "IVF4,PQ8x4", "ivf4-pq8x4"  # 4 lists, PQ of 8 x 4 bits over the tiny model's 32-d keys
WINDOWS = WindowSettings(32, 16, 128)  # the `datastore` fixture's: 6 batches


@pytest.fixture
def half_sample(monkeypatch, datastore):
    """Train on the first half of the keys (the real sample, 65,536 and more, is larger than
    the tiny corpus): training then happens in the middle of the build.  Returns its size."""
    n = datastore.count // 2
    monkeypatch.setattr(knnlm.core.index, "TRAIN_PQ", n)
    monkeypatch.setattr(knnlm.core.index, "TRAIN_PER_LIST", 1)
    return n


def queries(ds, n=30, seed=0):
    rng = np.random.default_rng(seed)
    q = np.asarray(ds.keys[rng.choice(ds.count, n, replace=False)], dtype=np.float32)
    return q + rng.normal(0, 0.05, q.shape).astype(np.float32)


def neighbours(ds, name, rerank):
    return Searcher(ds, name, nprobe=2, rerank=rerank).search(queries(ds), 8)


def build(lm, corpus, out, **kw):
    settings = BuildSettings(WINDOWS, index=IndexSettings(FACTORY, nprobe=2))
    return Datastore(build_datastore(lm, [corpus], out, settings, progress=False, **kw)[0])


def test_index_made_during_the_build_equals_one_built_after(lm, corpus, tmp_path, half_sample):
    """The filled index answers as build_index does with an index trained on the same first
    keys; it was trained before the last batch (the checkpoint appears mid-build) and
    index.json says which sample trained it."""
    trained_by_batch = []
    partial = tmp_path / "ds.partial"
    ds = build(lm, corpus, tmp_path / "ds",
               on_batch=lambda b: trained_by_batch.append((partial / f"trained-{NAME}.faiss").exists()))
    assert trained_by_batch[0] is False and trained_by_batch[-2] is True  # trained in between
    assert list_indexes(ds) == [NAME]
    info = json.loads((ds.path / "indexes" / NAME / "index.json").read_text())
    assert (info["train_size"], info["train_sample"], info["ntotal"]) == (half_sample, "first", ds.count)
    assert info["datastore_id"] == ds.id and not list(ds.path.glob("trained-*"))

    import faiss

    trained = faiss.index_factory(ds.dim, FACTORY)
    train_index(trained, np.asarray(ds.keys[:half_sample], dtype=np.float32), FACTORY)
    build_index(ds, FACTORY, name="after", trained=trained, progress=False)
    for rerank in (False, True):
        (d1, i1), (d2, i2) = neighbours(ds, NAME, rerank), neighbours(ds, "after", rerank)
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_array_equal(d1, d2)
    assert (i1 >= 0).all()


@pytest.mark.parametrize("checkpoint", ["kept", "lost"])
def test_build_killed_after_training_resumes_to_the_same_index(checkpoint, lm, corpus, tmp_path, half_sample,
                                                                monkeypatch):
    """Killed after the index was trained: the resumed build adds the keys on disk to the
    trained checkpoint (no second training), or, without it, trains again on the same first
    keys; either way the same index as an uninterrupted build."""
    ref = build(lm, corpus, tmp_path / "ref")
    partial = tmp_path / "ds.partial"

    def crash(b):
        if (partial / f"trained-{NAME}.faiss").exists():
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        build(lm, corpus, tmp_path / "ds", on_batch=crash)
    done = json.loads((partial / "progress.json").read_text())["batches_done"]
    assert 0 < done < 6 and not (tmp_path / "ds").exists()
    if checkpoint == "lost":
        (partial / f"trained-{NAME}.json").unlink()
    trainings = []
    real = knnlm.core.index.train_index
    monkeypatch.setattr(knnlm.core.index, "train_index", lambda *a: trainings.append(1) or real(*a))
    batches = []
    ds = build(lm, corpus, tmp_path / "ds", on_batch=batches.append)
    assert batches == list(range(done, 6)) and len(trainings) == (checkpoint == "lost")
    for rerank in (False, True):
        (d1, i1), (d2, i2) = neighbours(ds, NAME, rerank), neighbours(ref, NAME, rerank)
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_array_equal(d1, d2)
    assert (ds.path / "indexes" / NAME / "index.faiss").read_bytes() == \
        (ref.path / "indexes" / NAME / "index.faiss").read_bytes()


def test_bad_index_refused_before_the_forward_pass(lm, corpus, tmp_path, monkeypatch):
    """An invalid factory, or one the build's keys are too few to train, fails before any batch."""
    calls = []
    monkeypatch.setattr(lm, "forward", lambda *a, **kw: calls.append(1))
    for kind, message in (("NoSuchIndex12", "invalid FAISS factory string 'NoSuchIndex12'"),
                          ("IVF4096,Flat", "cannot train IVF4096,Flat on the")):
        with pytest.raises(KnnlmError, match=message):
            build_datastore(lm, [corpus], tmp_path / "ds", BuildSettings(WINDOWS, index=IndexSettings(kind)),
                            progress=False)
        assert not calls and not (tmp_path / "ds.partial").exists()


def test_cli_build_makes_its_index_during_the_build(corpus, llama_dir, tmp_path, capsys, monkeypatch):
    """`knnlm build` with no index option: the auto index (Flat at this size) comes with the
    datastore, not from a second pass over the keys (build_index is never called)."""
    def no_second_pass(*a, **kw):
        raise AssertionError("the index was built after the datastore")

    monkeypatch.setattr(knnlm.core.index, "build_index", no_second_pass)
    argv = ["-q", "build", str(corpus), "-o", str(tmp_path / "ds"), "--model", str(llama_dir), "--dtype", "float32",
            "--device", "cpu", "--window", "32", "--stride", "16", "--batch-tokens", "128", "--no-tune"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    ds = Datastore(tmp_path / "ds")
    assert list_indexes(ds) == ["flat"] and f"index {ds.path / 'indexes' / 'flat'}" in out
    monkeypatch.undo()
    shutil.copytree(ds.path, tmp_path / "after")
    ref = Datastore(tmp_path / "after")
    build_index(ref, "Flat", name="flat2", progress=False)
    np.testing.assert_array_equal(neighbours(ds, "flat", None)[1], neighbours(ref, "flat2", None)[1])
