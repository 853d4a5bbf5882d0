"""Editing a sharded datastore: added documents become a new shard, compaction rewrites the
shards that held removed documents; either equals a build with (without) those documents,
and an edit stopped at any step leaves the datastore as before or as after."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from test_bad_input import model_args, succeeds
from test_edit import BUILD, DOCS, GONE, assert_same_store, write_docs

from knnlm.core.datastore import Datastore, build_datastore
from knnlm.core.edit import remove_documents
from knnlm.core.index import build_index, verify_indexes
from knnlm.scale import open_datastore, open_searcher
from knnlm.scale.edit import add_documents, compact
from knnlm.scale.index import build_sharded_index
from knnlm.scale.split import split_datastore


@pytest.fixture(scope="module")
def builds(lm, tmp_path_factory):
    """Single datastores of all documents, of documents 0..3, and of all but GONE (Flat indexes)."""
    root = tmp_path_factory.mktemp("sharded-edit")
    out = {}
    for name, idx in (("full", range(len(DOCS))), ("first4", range(4)),
                      ("without", [i for i in range(len(DOCS)) if i != GONE])):
        out[name] = build_datastore(lm, [write_docs(root / f"{name}.jsonl", idx)], root / name, **BUILD)[0]
        build_index(Datastore(out[name]), "Flat", progress=False)
    out["more"] = write_docs(root / "more.jsonl", [4, 5])
    return out


def sharded(src, path, shards=2):
    """`src` split into shards, with a sharded Flat and a sharded IVF index."""
    split_datastore(src, path, shards)
    build_sharded_index(open_datastore(path), "Flat", progress=False)
    build_sharded_index(open_datastore(path), "IVF2,Flat", nprobe=2, progress=False)
    return path


def same_as(path, single, k=8):
    """The sharded datastore at `path` holds `single`'s entries and provenance, and its Flat
    search gives the same ids and distances."""
    a, b = open_datastore(path), Datastore(single)
    assert a.count == b.count and a.live == b.count
    assert_same_store(a, b, open_searcher, k)


def searchable(path):
    """Every index of every shard opens and finds each entry's own key first."""
    ds = open_datastore(path)
    ds.verify()
    verify_indexes(ds)
    q = np.asarray(ds.keys, dtype=np.float32)
    for name in ("flat", "ivf2-flat"):
        d, i = open_searcher(ds, name).search(q, 1)
        assert (d[:, 0] == 0).all() and (i >= 0).all()  # (each document's first entry ties with the others')


def test_add_makes_a_new_shard_equal_to_a_build_with_them(lm, builds, tmp_path):
    path = sharded(builds["first4"], tmp_path / "ds")
    e = add_documents(lm, path, [builds["more"]], batch_tokens=32, progress=False)
    assert (e["op"], e["count"], e["version"], e["first_document"], e["shard"]) == ("add", 2, 1, 4, 2)
    ds = open_datastore(path)
    assert len(ds.shards) == 3 and ds.version == 1 and ds.meta["corpora"][-1]["name"] == "more.jsonl"
    same_as(path, builds["full"])
    searchable(path)
    new = ds.shards[2].path / "indexes" / "ivf2-flat" / "index.json"  # the index's one training
    trained = json.loads((path / "indexes" / "ivf2-flat" / "index.json").read_text())
    assert json.loads(new.read_text())["trained_sha256"] == trained["trained_sha256"]
    assert trained["ntotal"] == ds.count and len(trained["shards"]) == 3
    new = np.arange(ds.offsets[2], ds.count)  # the new entries' own keys find them (or an entry with the
    _, i = open_searcher(ds, "ivf2-flat").search(np.asarray(ds.keys[new], dtype=np.float32), 1)  # same context)
    same = (np.asarray(ds.keys[i[:, 0]]) == np.asarray(ds.keys[new])).all(1)
    assert ((i[:, 0] == new) | same).all() and (i[:, 0] == new).mean() > 0.5


def test_remove_then_compact_equals_a_build_without(builds, tmp_path):
    path = sharded(builds["full"], tmp_path / "ds", 3)
    before = open_datastore(path)
    remove_documents(path, [GONE])
    e = compact(path)
    assert (e["op"], e["documents"], e["version"]) == ("compact", 1, 2)
    ds = open_datastore(path)
    assert ds.removed is None and ds.version == 2 and ds.id != before.id and len(ds.shards) == 3
    same_as(path, builds["without"])
    searchable(path)
    assert not list(tmp_path.glob("ds.*"))  # no partial or old directory left


def test_compact_drops_a_shard_left_empty_and_keeps_the_others_files(builds, tmp_path):
    path = sharded(builds["full"], tmp_path / "ds", 3)
    ds = open_datastore(path)
    last = list(range(int(ds.doc_offsets[2]), len(ds.docs)))  # every document of the last shard
    first = (ds.shards[0].path / "keys.npy").read_bytes()
    remove_documents(path, last)
    compact(path)
    ds = open_datastore(path)
    assert len(ds.shards) == 2 and len(ds.docs) == len(DOCS) - len(last)
    assert (ds.shards[0].path / "keys.npy").read_bytes() == first
    searchable(path)


def test_compact_of_everything_is_refused(builds, tmp_path):
    from knnlm.errors import KnnlmError

    path = sharded(builds["full"], tmp_path / "ds")
    remove_documents(path, range(len(DOCS)))
    before = (path / "manifest.json").read_text()
    with pytest.raises(KnnlmError, match="nothing would be left"):
        compact(path)
    assert (path / "manifest.json").read_text() == before


def boom_at(step):
    def boom(name):
        if name == step:
            raise RuntimeError("injected")
    return boom


@pytest.mark.parametrize("step", ["shard", "index flat", "index ivf2-flat", "committed"])
def test_interrupted_add_leaves_before_or_after_and_reruns(lm, builds, tmp_path, step):
    path = sharded(builds["first4"], tmp_path / "ds")
    before = (path / "manifest.json").read_text()
    with pytest.raises(RuntimeError):
        add_documents(lm, path, [builds["more"]], batch_tokens=32, progress=False, on_step=boom_at(step))
    if step == "committed":
        same_as(path, builds["full"])  # after
    else:
        assert (path / "manifest.json").read_text() == before  # before: the new shard is not listed
        same_as(path, builds["first4"])
        add_documents(lm, path, [builds["more"]], batch_tokens=32, progress=False)  # the same command again
        same_as(path, builds["full"])
    assert sorted(p.name for p in (path / "shards").iterdir()) == ["00000", "00001", "00002"]
    searchable(path)


@pytest.mark.parametrize("step", ["shard 0", "shard 1", "files", "published"])
def test_interrupted_compaction_leaves_before_or_after(builds, tmp_path, step):
    path = sharded(builds["full"], tmp_path / "ds", 3)
    remove_documents(path, [GONE])
    before = (path / "manifest.json").read_text()
    with pytest.raises(RuntimeError):
        compact(path, on_step=boom_at(step))
    if step == "published":
        assert open_datastore(path).removed is None
    else:
        assert (path / "manifest.json").read_text() == before and open_datastore(path).removed is not None
        compact(path)  # the same command again finishes it
    same_as(path, builds["without"])
    searchable(path)


def test_killed_sharded_add_process(builds, tmp_path, llama_dir):
    """`knnlm add` on a sharded datastore killed (os._exit) after writing the new shard's
    index, before the manifest: as before; the same command then finishes it."""
    path = sharded(builds["first4"], tmp_path / "ds")
    before = (path / "manifest.json").read_text()
    code = ("import os, sys\nimport knnlm.scale.edit as e\nreal = e.add_documents\n"
            "def killed(*a, **kw):\n    return real(*a, **kw, on_step=lambda n: os._exit(9) if n == 'index flat' "
            "else None)\ne.add_documents = killed\nfrom knnlm.cli.main import main\nsys.exit(main(sys.argv[1:]))\n")
    argv = ["-q", "add", str(path), str(builds["more"]), *model_args(llama_dir), "--batch-tokens", "32"]
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    assert r.returncode == 9, r.stderr
    assert (path / "manifest.json").read_text() == before
    same_as(path, builds["first4"])
    r = subprocess.run([sys.executable, "-m", "knnlm", *argv], capture_output=True, text=True)
    assert r.returncode == 0 and "a new shard" in r.stdout, r.stderr
    same_as(path, builds["full"])


def test_commands_on_a_sharded_datastore(builds, tmp_path, capsys, llama_dir):
    path = sharded(builds["first4"], tmp_path / "ds")
    out = succeeds(capsys, ["add", path, builds["more"], *model_args(llama_dir), "--batch-tokens", "32"])
    assert out.startswith("added 2 documents") and "a new shard: 2" in out
    out = succeeds(capsys, ["remove", path, "--title", f"doc{GONE}"])
    assert out.startswith("removed 1 documents")
    assert "compacted" in succeeds(capsys, ["compact", path])
    same_as(path, builds["without"])
    shutil.rmtree(path)
