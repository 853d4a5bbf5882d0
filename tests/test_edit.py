"""Editing a datastore: removed documents are never retrieved by any search path, compaction
equals a build without them, and interrupted or refused edits change nothing.

The corpus: six documents; document 2 (Zorblat) is the only place its text appears, and
each document fits one window, so a build without it computes the other keys bit for bit."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from test_bad_input import fails, model_args, succeeds

from knnlm.core.batching import plan_files
from knnlm.core.datastore import Datastore, build_datastore
from knnlm.core.edit import compact, edit_lock, remove_documents, select_documents
from knnlm.core.index import Searcher, build_index, verify_indexes
from knnlm.errors import KnnlmError
from knnlm.run.evaluate import score_plan

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "A kNN language model remembers what it has read.",
    "Zorblat the purple engineer sang seventeen songs about graphite.",
    "Memory helps the model predict rare words such as quizzical, zephyr and fjord.",
    "The lazy dog remembers the purple fox and the quick model.",
    "Rare words such as graphite help a language model predict.",
]
GONE = 2
BUILD = dict(window=32, stride=16, batch_tokens=32, progress=False)  # one document a batch


def write_docs(path, idx):
    path.write_text("".join(json.dumps({"title": f"doc{i}", "text": DOCS[i]}) + "\n" for i in idx))
    return path


@pytest.fixture(scope="module")
def built(lm, tmp_path_factory):
    """(the full datastore, the one built without document 2), each with a Flat and an IVF index."""
    root = tmp_path_factory.mktemp("edit")
    out = {}
    for name, idx in (("full", range(6)), ("without", [i for i in range(6) if i != GONE])):
        p = build_datastore(lm, [write_docs(root / f"{name}.jsonl", idx)], root / name, **BUILD)[0]
        build_index(Datastore(p), "Flat", progress=False)
        out[name] = p
    return out["full"], out["without"]


@pytest.fixture
def removed(built, tmp_path):
    """A copy of the full datastore with document 2 removed."""
    path = tmp_path / "ds"
    shutil.copytree(built[0], path)
    remove_documents(path, [GONE])
    return path


def gone_entries(path) -> np.ndarray:
    ds = Datastore(path)
    return np.arange(ds.docs[GONE, 2], ds.docs[GONE, 2] + ds.docs[GONE, 1] - 1)


def to_without(path, ids):
    """Entry ids of the full datastore -> the same entries' ids in the one built without document 2."""
    g = gone_entries(path)
    return np.where(ids > g[-1], ids - len(g), ids)


def canonical(d, i):
    """Rows ordered by (distance, id): every document's first entry has the same context (ties)."""
    order = np.lexsort((i, d), axis=-1)
    return np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)


def assert_same_store(a, b, open_search, k, arrays=("keys", "vals", "tokens")):
    """Opened datastores `a` and `b` hold the same `arrays` and document titles, and their
    "flat" indexes (opened with `open_search(ds, "flat")`) give every key of `b` the same
    neighbours at the same distances."""
    for name in arrays:
        np.testing.assert_array_equal(np.asarray(getattr(a, name)), np.asarray(getattr(b, name)))
    assert [x["title"] for x in a.doc_info] == [x["title"] for x in b.doc_info]
    q = np.asarray(b.keys, dtype=np.float32)
    d, i = canonical(*open_search(a, "flat").search(q, k))
    d0, i0 = canonical(*open_search(b, "flat").search(q, k))
    np.testing.assert_array_equal(i, i0)
    np.testing.assert_array_equal(d, d0)


def gone_queries(path):
    """The removed document's own keys: their nearest entries are its own."""
    return np.asarray(Datastore(path).keys[gone_entries(path)], dtype=np.float32)


def test_remove_is_recorded_and_versioned(removed, built):
    ds = Datastore(removed)
    assert ds.version == 1 and ds.removed_documents.tolist() == [GONE]
    assert ds.removed.nonzero()[0].tolist() == gone_entries(removed).tolist()
    assert ds.live == Datastore(built[1]).count
    e = ds.meta["edits"][-1]
    assert (e["op"], e["documents"], e["entries"]) == ("remove", [GONE], len(gone_entries(removed)))


@pytest.mark.parametrize("backend", ["flat", "flat-few", "ivf", "mmap-ivf", "torch", "sharded"])
def test_no_search_backend_returns_a_removed_entry(removed, built, backend, tmp_path):
    """Each backend, searched with the removed document's own keys: none of its entries come
    back; the exact ones give what the datastore built without it gives."""
    from knnlm.retrieval.device import DeviceSearcher
    from knnlm.scale import open_datastore, open_searcher

    q = gone_queries(removed)
    if backend == "flat-few":
        q = q[:3]  # fewer than FEW_QUERIES: the float16 scan
    k = 12
    if backend in ("ivf", "mmap-ivf"):
        build_index(Datastore(removed), "IVF4,Flat", nprobe=4, progress=False)
        s = Searcher(Datastore(removed), "ivf4-flat", mmap=backend == "mmap-ivf")
    elif backend == "torch":
        s = DeviceSearcher(Datastore(removed), "cpu")
    elif backend == "sharded":
        from knnlm.scale.index import build_sharded_index
        from knnlm.scale.split import split_datastore

        out = split_datastore(built[0], tmp_path / "sharded", 3)
        build_sharded_index(open_datastore(out), "Flat", progress=False)
        remove_documents(out, [GONE])  # by its global id, in the manifest
        s = open_searcher(open_datastore(out))
        assert s.ds.version == 1 and s.ds.live == Datastore(built[1]).count
    else:
        s = Searcher(Datastore(removed), "flat")
    d, i = s.search(q, k)
    assert not np.isin(i, gone_entries(removed)).any() and (i >= 0).all()
    assert np.isinf(s.exact(q, i[:, :1] * 0 + gone_entries(removed)[:1])).all()  # pointers cannot land there
    if backend in ("flat", "flat-few", "torch", "sharded"):
        d0, i0 = canonical(*Searcher(Datastore(built[1]), "flat").search(q, k))
        d, i = canonical(d, to_without(removed, i))
        np.testing.assert_array_equal(i, i0)
        np.testing.assert_allclose(d, d0, rtol=1e-6)


def test_eval_explain_pointers_and_tune_paths(lm, removed, built, tmp_path):
    """On the removed document's own text: eval's perplexity equals the datastore built without
    it (Flat, to 1e-6), kept neighbours (explain) hold none of its entries, pointers neither,
    and leave-own-document-out search (tune) neither."""
    from knnlm.retrieval.pointers import Pointers
    from knnlm.run.options import RetrievalSettings

    text = write_docs(tmp_path / "t.jsonl", [GONE])
    plan = plan_files(lm, [text], 32, 16, 32)
    runs = {}
    for name, path in (("removed", removed), ("without", built[1])):
        s = score_plan(lm, plan, Searcher(Datastore(path), "flat"), retrieval=RetrievalSettings(k=8),
                       keep_neighbors=True, progress=False)
        runs[name] = s
    assert not np.isin(runs["removed"].ids, gone_entries(removed)).any()
    np.testing.assert_allclose(runs["removed"].knn, runs["without"].knn, atol=1e-6)
    p = score_plan(lm, plan, Searcher(Datastore(removed), "flat"),
                   retrieval=RetrievalSettings(k=8, pointers=Pointers(threshold=1)), progress=False)
    p0 = score_plan(lm, plan, Searcher(Datastore(built[1]), "flat"),
                    retrieval=RetrievalSettings(k=8, pointers=Pointers(threshold=1)), progress=False)
    np.testing.assert_allclose(p.knn, p0.knn, atol=1e-6)
    ds = Datastore(removed)
    own = np.full(len(gone_queries(removed)), int(ds.docs[0, 2]))  # leave document 0 out as well
    _, i = Searcher(ds, "flat").search(gone_queries(removed), 8, exclude=own)
    assert not np.isin(i, gone_entries(removed)).any()
    assert not np.isin(i, np.arange(ds.docs[0, 2], ds.docs[0, 2] + ds.docs[0, 1] - 1)).any()


def test_self_tuning_reads_no_removed_document(lm, removed, monkeypatch):
    import knnlm.run.selftune as selftune

    read = []
    real = selftune.piece_plan
    monkeypatch.setattr(selftune, "piece_plan", lambda ds, pieces, *a: read.extend(pieces) or real(ds, pieces, *a))
    selftune.self_tune(lm, Datastore(removed), sample_tokens=10_000, k=8, progress=False, record=False)
    assert sorted({p[0] for p in read}) == [d for d in range(6) if d != GONE]


def test_generate_and_score(lm, removed):
    from knnlm.run.generate import KNNLM

    knn = KNNLM(lm, {"ds": removed})
    g = knn.generate("Zorblat the purple", 6, datastore="ds", lam=0.5, k=8, neighbors=8)
    s = knn.score(DOCS[GONE], datastore="ds", lam=0.5, k=8, neighbors=8)
    seen = [n.entry for t in g.tokens + s.tokens for n in t.neighbors]
    assert seen and not np.isin(seen, gone_entries(removed)).any()
    assert f"doc{GONE}" not in [d["title"] for d in s.documents()]

def test_memory_decoder_targets_equal_a_build_without(removed, built, tmp_path):
    """The sparse p_kNN targets of every other position are those of the datastore built without it."""
    from knnlm.memory.targets import TargetSettings, build_targets
    from knnlm.run.options import RetrievalSettings

    eight = dict(targets=TargetSettings(keep=8), retrieval=RetrievalSettings(k=8), progress=False)
    got = build_targets(removed, tmp_path / "a", **eight)
    want = build_targets(built[1], tmp_path / "b", **eight)
    kept = np.setdiff1d(np.arange(Datastore(removed).count), gone_entries(removed))
    np.testing.assert_array_equal(np.load(got / "ids.npy")[kept], np.load(want / "ids.npy"))
    np.testing.assert_allclose(np.load(got / "probs.npy")[kept], np.load(want / "probs.npy"), atol=1e-6)


def test_remove_then_compact_equals_a_build_without(removed, built):
    e = compact(removed)
    assert (e["op"], e["documents"], e["version"]) == ("compact", 1, 2)
    a, b = Datastore(removed), Datastore(built[1])
    assert a.removed is None and a.count == b.count and a.version == 2
    for name in ("keys", "vals", "tokens", "docs"):
        np.testing.assert_array_equal(np.asarray(getattr(a, name)), np.asarray(getattr(b, name)))
    assert [x["title"] for x in a.doc_info] == [x["title"] for x in b.doc_info]
    a.verify()
    q = np.asarray(b.keys, dtype=np.float32)
    d, i = canonical(*Searcher(a, "flat").search(q, 12))
    d0, i0 = canonical(*Searcher(b, "flat").search(q, 12))
    np.testing.assert_array_equal(i, i0)
    np.testing.assert_array_equal(d, d0)


def test_compact_keeps_an_ivf_training(removed):
    import faiss

    build_index(Datastore(removed), "IVF4,Flat", nprobe=4, progress=False)
    before = faiss.read_index(str(removed / "indexes" / "ivf4-flat" / "index.faiss"))
    compact(removed)
    after = faiss.read_index(str(removed / "indexes" / "ivf4-flat" / "index.faiss"))
    cents = [faiss.rev_swig_ptr(faiss.downcast_index(x.quantizer).get_xb(), 4 * x.d).copy() for x in (before, after)]
    np.testing.assert_array_equal(*cents)
    assert after.ntotal == Datastore(removed).count
    _, i = Searcher(Datastore(removed), "ivf4-flat").search(gone_queries(removed), 4)
    assert (i >= 0).all()


@pytest.mark.parametrize("step", ["files", "index flat", "published"])
def test_interrupted_compaction_leaves_before_or_after(removed, step):
    before = (removed / "meta.json").read_text()

    def boom(name):
        if name == step:
            raise RuntimeError("injected")

    with pytest.raises(RuntimeError):
        compact(removed, on_step=boom)
    ds = Datastore(removed)
    if step == "published":
        assert ds.removed is None and ds.version == 2
    else:
        assert (removed / "meta.json").read_text() == before and ds.removed is not None
        compact(removed)  # the same command again finishes it
        assert Datastore(removed).removed is None
    Datastore(removed).verify()


def test_killed_compaction_process(removed):
    """A compaction killed (os._exit) after its files and first index: the datastore is as
    before; running it again finishes."""
    before = (removed / "meta.json").read_text()
    code = ("import os, sys\nfrom knnlm.core.edit import compact\n"
            "compact(sys.argv[1], on_step=lambda name: os._exit(9) if name.startswith('index') else None)\n")
    r = subprocess.run([sys.executable, "-c", code, str(removed)], capture_output=True, text=True)
    assert r.returncode == 9, r.stderr
    assert (removed / "meta.json").read_text() == before and Datastore(removed).removed is not None
    compact(removed)
    assert Datastore(removed).removed is None


def test_refused_edits_change_nothing(removed, capsys):
    before = (removed / "meta.json").read_text()
    assert "no document 99" in fails(capsys, ["remove", removed, "--doc", "99"])
    assert "already removed" in fails(capsys, ["remove", removed, "--doc", str(GONE)])
    assert "no document titled" in fails(capsys, ["remove", removed, "--title", "nope"])
    with edit_lock(removed):
        assert "being edited by another process" in fails(capsys, ["remove", removed, "--doc", "0"])
        assert "being edited" in fails(capsys, ["compact", removed])
    assert (removed / "meta.json").read_text() == before


def test_remove_command(built, tmp_path, capsys, llama_dir):
    path = tmp_path / "ds"
    shutil.copytree(built[0], path)
    out = succeeds(capsys, ["remove", path, "--match", "^doc[34]$", "--dry-run"])
    assert out.splitlines()[0].startswith("would remove 2 documents") and "doc3" in out and "doc4" in out
    assert Datastore(path).removed is None
    ds = Datastore(path)
    assert select_documents(ds, text_pattern="Zorblat", decode=lm_decode(llama_dir)) == [GONE]
    out = succeeds(capsys, ["remove", path, "--source", "full.jsonl", "--dry-run"])
    assert out.startswith("would remove 6 documents")
    out = succeeds(capsys, ["remove", path, "--title", "doc2", "--doc", "5"])
    assert out.startswith("removed 2 documents") and "version 1" in out
    info = succeeds(capsys, ["info", path])
    assert "2 documents" in info and "version" in info
    assert succeeds(capsys, ["compact", path]).startswith(f"compacted {path}: 2 removed documents")
    assert Datastore(path).count == ds.count - int((ds.docs[[2, 5], 1] - 1).sum())
    with pytest.raises(KnnlmError, match="nothing to compact"):
        compact(path)


def lm_decode(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return lambda ids: tok.decode([int(i) for i in ids])


# ---- add ---------------------------------------------------------------------------------
@pytest.fixture
def first4(built, tmp_path, lm):
    """A datastore of documents 0..3 (Flat and IVF indexes), and the file of documents 4 and 5."""
    path = build_datastore(lm, [write_docs(tmp_path / "first4.jsonl", range(4))], tmp_path / "ds", **BUILD)[0]
    build_index(Datastore(path), "Flat", progress=False)
    return path, write_docs(tmp_path / "more.jsonl", [4, 5])


def same_as(a_path, b_path, k=10):
    """Two datastores hold the same entries, provenance and Flat search results."""
    assert_same_store(Datastore(a_path), Datastore(b_path), Searcher, k, ("keys", "vals", "tokens", "docs"))


def test_add_equals_a_build_with_them(lm, first4, built):
    from knnlm.core.edit import add_documents

    path, more = first4
    build_index(Datastore(path), "IVF4,Flat", nprobe=4, progress=False)
    e = add_documents(lm, path, [more], batch_tokens=32, progress=False)
    assert (e["op"], e["count"], e["version"], e["first_document"]) == ("add", 2, 1, 4)
    full = Datastore(built[0])
    assert Datastore(path).count == full.count
    assert np.load(path / "keys.npy").shape == full.keys.shape  # the header says so too
    Datastore(path).verify()
    same_as(path, built[0])
    assert Datastore(path).doc_info[4]["version"] == 1  # provenance: the version that added it
    _, i = Searcher(Datastore(path), "ivf4-flat").search(np.asarray(full.keys[-5:], np.float32), 1)
    assert (i[:, 0] >= Datastore(built[0]).docs[4, 2]).all()  # the IVF index took the new codes
    assert sorted(p.name for p in (path / "indexes" / "flat").iterdir()) == ["index.faiss", "index.json"]


def test_add_then_remove_gives_the_original_results(lm, first4):
    from knnlm.core.edit import add_documents

    path, more = first4
    q = np.asarray(Datastore(path).keys, dtype=np.float32)
    before = Searcher(Datastore(path), "flat").search(q, 8)
    add_documents(lm, path, [more], batch_tokens=32, progress=False)
    remove_documents(path, [4, 5])
    after = Searcher(Datastore(path), "flat").search(q, 8)
    np.testing.assert_array_equal(canonical(*after)[1], canonical(*before)[1])
    np.testing.assert_array_equal(canonical(*after)[0], canonical(*before)[0])


@pytest.mark.parametrize("step", ["keys", "files", "index flat", "committed"])
def test_interrupted_add_leaves_before_or_after_and_reruns(lm, first4, built, tmp_path, step):
    from knnlm.core.edit import add_documents

    path, more = first4
    saved = tmp_path / "saved"
    shutil.copytree(path, saved)

    def boom(name):
        if name == step:
            raise RuntimeError("injected")

    with pytest.raises(RuntimeError):
        add_documents(lm, path, [more], batch_tokens=32, progress=False, on_step=boom)
    if step == "committed":
        same_as(path, built[0])  # after (the index file is renamed by the next edit)
    else:
        same_as(path, saved)  # before: readers see the rows meta.json names
        add_documents(lm, path, [more], batch_tokens=32, progress=False)  # the same command again
        same_as(path, built[0])
    with edit_lock(path):
        pass  # settles the files
    Datastore(path).verify()
    verify_indexes(Datastore(path))
    same_as(path, built[0])


def test_killed_add_process(first4, built, llama_dir):
    """`knnlm add` killed (os._exit) after appending the rows, before the commit: the datastore
    is as before (and byte for byte after the next edit settles it); the same command finishes."""
    path, more = first4
    before = Datastore(path).meta["sha256"]
    code = ("import os, sys\nimport knnlm.core.edit as e\nreal = e.add_documents\n"
            "def killed(*a, **kw):\n    return real(*a, **kw, on_step=lambda n: os._exit(9) if n == 'files' else None)\n"
            "e.add_documents = killed\nfrom knnlm.cli.main import main\nsys.exit(main(sys.argv[1:]))\n")
    argv = ["-q", "add", str(path), str(more), *model_args(llama_dir), "--batch-tokens", "32"]
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    assert r.returncode == 9, r.stderr
    assert Datastore(path).count < Datastore(built[0]).count
    with edit_lock(path):
        pass
    assert Datastore(path).meta["sha256"] == before
    Datastore(path).verify()
    r = subprocess.run([sys.executable, "-m", "knnlm", *argv], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("added 2 documents"), r.stderr
    same_as(path, built[0])


def test_add_refusals_change_nothing(first4, model_dirs, capsys):
    path, more = first4
    before = (path / "meta.json").read_text()
    other = next(d for a, d in model_dirs.items() if a != "llama")
    assert "was built with" in fails(capsys, ["add", path, more, *model_args(other)])
    with edit_lock(path):
        assert "being edited" in fails(capsys, ["add", path, more, *model_args(model_dirs["llama"])])
    assert (path / "meta.json").read_text() == before
