"""Sharded datastores (knnlm.scale): manifest, sharded search in process and on Ray,
distributed build on Ray, bad manifests.

Ray runs locally with 2 CPUs, started once for this module and shut down after.  The
corpus is 12 documents of shuffled words, so no two keys are equal and neighbour lists
have no ties to order.
"""

import json
import os
import shutil
import signal
import sys

import numpy as np
import pytest
from test_bad_input import fails, model_args, succeeds
from tiny import TEXT

from knnlm.core.datastore import Datastore, build_datastore
from knnlm.core.index import Searcher, build_index
from knnlm.errors import KnnlmError
from knnlm.scale import ShardedDatastore, open_datastore, open_searcher
from knnlm.scale.index import build_sharded_index
from knnlm.scale.manifest import write_manifest
from knnlm.scale.split import document_cuts, split_datastore

SETTINGS = dict(window=32, stride=16, batch_tokens=128)
WINDOWS = ["--window", "32", "--stride", "16", "--batch-tokens", "128"]


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    from knnlm.scale.cluster import runtime_env

    ray.init(num_cpus=2, runtime_env=runtime_env(), include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    rng = np.random.default_rng(0)
    words = TEXT.split()
    p = tmp_path_factory.mktemp("scale") / "docs.jsonl"
    p.write_text("".join(json.dumps({"title": f"doc{i}", "text": " ".join(rng.choice(words, rng.integers(8, 60)))})
                         + "\n" for i in range(12)))
    return p


@pytest.fixture(scope="module")
def single(lm, docs, tmp_path_factory):
    out = tmp_path_factory.mktemp("scale") / "single"
    build_datastore(lm, [docs], out, progress=False, **SETTINGS)
    ds = Datastore(out)
    build_index(ds, "Flat", progress=False)
    return ds


@pytest.fixture(scope="module")
def sharded(single, tmp_path_factory):
    out = split_datastore(single.path, tmp_path_factory.mktemp("scale") / "sharded", 3)
    build_sharded_index(open_datastore(out), "Flat", progress=False)
    return open_datastore(out)


def queries(ds, n=40, seed=1):
    """Keys of the datastore plus noise: near, but never equal to, stored keys."""
    rng = np.random.default_rng(seed)
    q = np.asarray(ds.keys[rng.choice(ds.count, n, replace=False)], dtype=np.float32)
    return q + rng.normal(0, 0.05, q.shape).astype(np.float32)


def canonical(d, i):
    """Rows ordered by (distance, id): duplicate keys (every document's first entry has the
    same context) tie, and FAISS leaves the order of ties open."""
    order = np.lexsort((i, d), axis=-1)
    return np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)


def test_document_cuts_golden():
    """4 documents of 10 entries in 2 shards cut at document 2; 3 shards at 1 and 2 (or 3)."""
    starts = np.array([0, 10, 20, 30])
    assert document_cuts(starts, 40, 2) == [0, 2, 4]
    assert document_cuts(starts, 40, 4) == [0, 1, 2, 3, 4]
    cuts = document_cuts(starts, 40, 3)
    assert cuts[0] == 0 and cuts[-1] == 4 and len(set(cuts)) == 4


def test_merge_is_independent_of_grouping():
    """Shards' top-k lists merged in any grouping (in process, actors of 1, 2 or 4 groups) give
    the same ids in the same order, ties included (by distance, then id)."""
    from knnlm.scale.search import merge_topk

    rng = np.random.default_rng(0)
    dists = [np.sort(rng.integers(0, 6, (5, 7)).astype(np.float32), 1) for _ in range(4)]  # many ties
    ids = [rng.permutation(np.arange(7 * 5))[:35].reshape(5, 7) + 100 * s for s in range(4)]
    want = merge_topk(dists, ids, 10)
    for groups in ([[0, 1, 2, 3]], [[0, 2], [1, 3]], [[3], [1], [0, 2]]):
        parts = [merge_topk([dists[s] for s in g], [ids[s] for s in g], 10) for g in groups]
        got = merge_topk([d for d, _ in parts], [i for _, i in parts], 10)
        assert np.array_equal(got[1], want[1]) and np.array_equal(got[0], want[0])
    assert (np.diff(want[0], axis=1) >= 0).all()


def test_manifest_round_trip(single, sharded, capsys):
    assert isinstance(sharded, ShardedDatastore) and len(sharded.shards) == 3
    assert sharded.count == single.count and sharded.dim == single.dim and sharded.key_point == single.key_point
    ids = np.arange(single.count)
    assert np.array_equal(np.asarray(sharded.keys[ids]), np.asarray(single.keys))
    assert np.array_equal(sharded.vals[ids], np.asarray(single.vals))
    assert np.array_equal(sharded.vals[5:17], single.vals[5:17])
    assert list(sharded.doc_info) == list(single.doc_info)
    for a, b in zip(sharded.provenance(ids), single.provenance(ids)):
        assert np.array_equal(a, b)
    assert np.array_equal(sharded.document_of(ids), single.document_of(ids))
    assert np.array_equal(sharded.docs, single.docs)  # global token starts and first entries
    assert np.array_equal(np.asarray(sharded.tokens), np.asarray(single.tokens))
    assert np.array_equal(sharded.tokens[3:40], single.tokens[3:40])
    for e in (0, sharded.offsets[1] - 1, sharded.offsets[1], sharded.count - 1):
        assert sharded.context(int(e)) == single.context(int(e))
    sharded.check_compatible(single.meta["identity"])
    sharded.verify()
    again = open_datastore(sharded.path)
    assert again.id == sharded.id and again.manifest == sharded.manifest
    out = succeeds(capsys, ["info", sharded.path, "--verify"])
    assert "ok (all 3 shards)" in out
    assert str(single.count) in out


@pytest.mark.parametrize("exclude", [False, True])
def test_sharded_exact_search_equals_single(single, sharded, exclude):
    q = queries(single)
    own = np.random.default_rng(2).integers(0, single.count, len(q)) if exclude else None  # own entry ids
    d1, i1 = canonical(*Searcher(single).search(q, 50, own))
    s = open_searcher(sharded)
    assert s.settings()["shards"] == 3
    d2, i2 = s.search(q, 50, own)
    assert np.array_equal(i1, i2)
    np.testing.assert_allclose(d1, d2, rtol=1e-6)
    assert i2.dtype == np.int64 and d2.dtype == np.float32
    if exclude:
        assert not (sharded.document_of(i2) == sharded.document_of(own)[:, None]).any()  # short documents: all out


def test_split_inside_a_document(datastore, tmp_path):
    """One document (a .txt stream) cut at equal entry counts: the same entries and values,
    every value's token still found by context(), and the same exact search."""
    out = split_datastore(datastore.path, tmp_path / "s", 3, at="entries")
    ds = open_datastore(out)
    build_sharded_index(ds, "Flat", progress=False)
    ids = np.arange(datastore.count)
    assert [s.count for s in ds.shards] == [round((i + 1) * ds.count / 3) - round(i * ds.count / 3)
                                            for i in range(3)]
    assert np.array_equal(np.asarray(ds.keys[ids]), np.asarray(datastore.keys))
    assert np.array_equal(ds.vals[ids], np.asarray(datastore.vals))
    assert [ds.context(int(e))[1] for e in ids] == datastore.vals.tolist()
    assert ds.doc_info[1]["split_offset"] == ds.offsets[1]
    q = queries(datastore)
    d1, i1 = canonical(*Searcher(datastore).search(q, 20))
    d2, i2 = open_searcher(ds).search(q, 20)
    assert np.array_equal(i1, i2)
    np.testing.assert_allclose(d1, d2, rtol=1e-6)


def test_one_trained_index_over_shards(single, sharded, tmp_path):
    """IVF-PQ trained once: every shard's index names the same training; re-ranked distances
    are exact; with every list probed it finds most of the exact neighbours."""
    ds = open_datastore(shutil.copytree(sharded.path, tmp_path / "s"))
    path = build_sharded_index(ds, "IVF4,PQ8", train_size=10_000, progress=False)
    info = json.loads((path / "index.json").read_text())
    shard_infos = [json.loads((s.path / "indexes" / path.name / "index.json").read_text()) for s in ds.shards]
    assert {i["trained_sha256"] for i in shard_infos} == {info["trained_sha256"]}
    assert [i["datastore_id"] for i in shard_infos] == [s.id for s in ds.shards] == info["shards"]
    q = queries(single)
    d, i = open_searcher(ds, "ivf4-pq8", nprobe=4).search(q, 20)
    exact = ((np.asarray(ds.keys[i], dtype=np.float32) - q[:, None]) ** 2).sum(-1)
    np.testing.assert_allclose(d, exact, rtol=1e-4, atol=1e-4)
    assert (np.diff(d, axis=1) >= 0).all()
    _, truth = Searcher(single).search(q, 20)
    recall = np.mean([len(set(a) & set(b)) / 20 for a, b in zip(i, truth)])
    assert recall > 0.5


def wait_dead(ray, actor, seconds: float = 60.0) -> None:
    """Until calls to `actor` fail (it is dead for good), at most `seconds`."""
    import time

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            ray.get(actor.pid.remote(), timeout=5)
        except Exception:
            return
        time.sleep(0.2)
    raise AssertionError("the killed actor still answers")


def test_ray_search_survives_a_killed_actor(ray_local, sharded):
    q = queries(sharded)
    want = open_searcher(sharded).search(q, 30)
    s = open_searcher(sharded, backend="ray", actors=2)
    try:
        assert s.settings()["groups"] == 2
        got = s.search(q, 30)
        assert np.array_equal(got[1], want[1]) and np.array_equal(got[0], want[0])
        os.kill(ray_local.get(s.parts[0].pid.remote()), signal.SIGKILL)  # dies between searches
        got = s.search(q, 30)
        assert np.array_equal(got[1], want[1]) and np.array_equal(got[0], want[0])
        pid = ray_local.get(s.parts[1].pid.remote())
        ray_local.get(s.parts[1].crash_during_next_search.remote())  # dies in the middle of a search
        got = s.search(q, 30, exclude=np.full(len(q), -1))
        assert np.array_equal(got[1], want[1]) and np.array_equal(got[0], want[0])
        assert ray_local.get(s.parts[1].pid.remote()) != pid  # restarted
        ray_local.kill(s.parts[0], no_restart=True)  # cannot come back: an error, not fewer neighbours
        wait_dead(ray_local, s.parts[0])  # ray.kill returns before the actor is gone: a search could still reach it
        with pytest.raises(KnnlmError, match="died and could not be restarted"):
            s.search(q, 30)
    finally:
        s.close()


def _log_batches(log):
    """on_batch hook run in the build workers: logs (shard, batch); shard 1 dies once after batch 0."""
    def hook(shard, batch):
        with open(log, "a") as f:
            f.write(f"{shard} {batch}\n")
        if shard == 1 and batch == 0 and not os.path.exists(log + ".crashed"):
            open(log + ".crashed", "w").close()
            os._exit(1)
    return hook


def test_distributed_build_resumes_and_equals_one_worker(ray_local, lm, docs, tmp_path):
    import ray.cloudpickle

    from knnlm.scale.build import build_sharded

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    settings = {**SETTINGS, "batch_tokens": 32}  # one window a batch: shards may start at any document
    single = Datastore(build_datastore(lm, [docs], tmp_path / "single", progress=False, **settings)[0])
    one = open_datastore(build_sharded(lm, [docs], tmp_path / "one", workers=1, **settings))
    log = str(tmp_path / "batches.log")
    three = open_datastore(build_sharded(lm, [docs], tmp_path / "three", workers=3, on_batch=_log_batches(log),
                                         **settings))
    assert len(one.shards) == 1 and len(three.shards) == 3
    assert os.path.exists(log + ".crashed")
    seen = [tuple(map(int, line.split())) for line in open(log)]
    assert seen.count((1, 0)) == 1 and len(seen) == len(set(seen))  # shard 1 resumed after its batch 0
    ids = np.arange(single.count)
    for ds in (one, three):
        assert ds.count == single.count
        assert np.array_equal(np.asarray(ds.keys[ids]), np.asarray(single.keys))  # bit for bit on CPU
        assert np.array_equal(ds.vals[ids], np.asarray(single.vals))
        assert list(ds.doc_info) == list(single.doc_info)
        for a, b in zip(ds.provenance(ids), single.provenance(ids)):
            assert np.array_equal(a, b)
    assert not (tmp_path / "three.partial").exists()


def test_build_workers_cli(ray_local, llama_dir, docs, tmp_path, capsys):
    out = succeeds(capsys, ["build", docs, "-o", tmp_path / "ds", "--workers", "2", "--index", "Flat",
                            *model_args(llama_dir), *WINDOWS])
    assert "2 shards" in out and "tuned on" in out
    ds = open_datastore(tmp_path / "ds")
    assert isinstance(ds, ShardedDatastore)
    # self-tuned as the single-process build is, over all shards, recorded in the manifest
    succeeds(capsys, ["build", docs, "-o", tmp_path / "one", "--index", "Flat", *model_args(llama_dir), *WINDOWS])
    want, got = Datastore(tmp_path / "one").settings, open_datastore(tmp_path / "ds").settings
    assert got is not None and got["index"]["shards"] == 2
    for f in ("k", "lambda", "temperature", "tokens", "pieces"):
        assert got[f] == want[f], f
    assert got["ppl_knnlm"] == pytest.approx(want["ppl_knnlm"], rel=1e-6)
    text = tmp_path / "t.txt"
    text.write_text(TEXT[:300])
    res = tmp_path / "r.json"
    succeeds(capsys, ["eval", text, "-d", tmp_path / "ds", "-k", "8", "-o", res, *model_args(llama_dir), *WINDOWS])
    local = json.loads(res.read_text())
    succeeds(capsys, ["eval", text, "-d", tmp_path / "ds", "-k", "8", "-o", res, "--search-actors", "2",
                      *model_args(llama_dir), *WINDOWS])
    assert json.loads(res.read_text())["ppl_knnlm"] == local["ppl_knnlm"]
    assert local["shards"] == 2
    out = succeeds(capsys, ["explain", text, "-d", tmp_path / "ds", "-k", "8", "--top", "2",
                            *model_args(llama_dir), *WINDOWS])
    assert "doc" in out  # neighbours' titles come from the shards' document tables
    from knnlm.run.generate import KNNLM

    knn = KNNLM.load(str(llama_dir), {"s": tmp_path / "ds"}, dtype="float32", k=8)
    g = knn.generate("The quick brown", max_new_tokens=3, neighbors=2)
    assert len(g.tokens) == 3 and all(n.title.startswith("doc") for t in g.tokens for n in t.neighbors)


def test_pointers_on_shards_equal_unsharded(single, sharded, docs, llama_dir, tmp_path, capsys):
    """RetoMaton pointers follow global entry ids through the shards' joined document table."""
    res = {}
    for name, ds in (("single", single), ("sharded", sharded)):
        out = tmp_path / f"{name}.json"
        succeeds(capsys, ["eval", docs, "-d", ds.path, "-k", "8", "--pointers", "1", "-o", out,
                          *model_args(llama_dir), *WINDOWS])
        res[name] = json.loads(out.read_text())
    assert res["sharded"]["search_rate"] == res["single"]["search_rate"] < 1  # pointers replaced searches
    assert res["sharded"]["ppl_knnlm"] == pytest.approx(res["single"]["ppl_knnlm"], rel=1e-6)


def test_index_workers_cli(ray_local, sharded, tmp_path, capsys):
    """`knnlm index --workers`: trained once here, the shards' keys added by Ray tasks; the
    same index as adding them here (IVF probing every list: exact neighbours)."""
    q = queries(sharded)
    want = canonical(*open_searcher(sharded, "flat").search(q, 20))
    for workers in ("2", "0"):
        path = shutil.copytree(sharded.path, tmp_path / f"w{workers}")
        out = succeeds(capsys, ["index", path, "--type", "IVF4,Flat", "--nprobe", "4", "--train-size", "200",
                                "--workers", workers])
        assert f"{sharded.count} keys" in out
        ds = open_datastore(path)
        trained = {json.loads((s.path / "indexes" / "ivf4-flat" / "index.json").read_text())["trained_sha256"]
                   for s in ds.shards}
        assert len(trained) == 1  # one training for all shards
        d, i = canonical(*open_searcher(ds, "ivf4-flat").search(q, 20))
        assert np.array_equal(i, want[1])
        np.testing.assert_allclose(d, want[0], rtol=1e-5, atol=1e-5)


# ---- bad manifests: one error line each ----------------------------------------------------
@pytest.fixture
def copy(sharded, tmp_path):
    return shutil.copytree(sharded.path, tmp_path / "copy")


def test_missing_shard(copy, capsys):
    shutil.rmtree(copy / "shards" / "00001")
    err = fails(capsys, ["info", copy])
    assert "shard 1" in err and "missing" in err


def test_corrupted_shard(copy, sharded, capsys):
    meta = copy / "shards" / "00002" / "meta.json"
    meta.write_text(meta.read_text().replace('"count"', '"count" ', 1))
    assert "corrupted or was replaced" in fails(capsys, ["info", copy])
    shutil.copy(sharded.shards[2].path / "meta.json", meta)
    with open(copy / "shards" / "00001" / "vals.npy", "r+b") as f:  # a damaged file: found by --verify
        f.seek(-4, 2)
        f.write(b"\xff\xff\xff\x7f")
    succeeds(capsys, ["info", copy])
    assert "does not match its checksum" in fails(capsys, ["info", copy, "--verify"])


def test_corrupted_manifest(copy, capsys):
    (copy / "manifest.json").write_text("{not json")
    assert "corrupted manifest" in fails(capsys, ["info", copy])
    (copy / "manifest.json").write_text(json.dumps({"format": "knnlm-sharded-datastore", "format_version": 1}))
    assert "corrupted manifest" in fails(capsys, ["info", copy])


def test_shards_of_different_models(copy, model_dirs, docs, tmp_path, capsys):
    from knnlm.core.corpus import file_sha256
    from knnlm.core.model import LM

    other = LM.load(str(model_dirs["gpt2"]), dtype="float32")
    build_datastore(other, [docs], tmp_path / "other", progress=False, **SETTINGS)
    with pytest.raises(KnnlmError, match="different models"):
        write_manifest(tmp_path / "mixed", [copy / "shards" / "00000", tmp_path / "other"])
    m = json.loads((copy / "manifest.json").read_text())  # a manifest edited by hand
    o = Datastore(tmp_path / "other")
    m["shards"][1] = {"path": str(o.path), "id": o.id, "count": o.count, "meta_sha256": file_sha256(o.path / "meta.json")}
    (copy / "manifest.json").write_text(json.dumps(m))
    assert "different models" in fails(capsys, ["info", copy])


def test_index_of_another_datastore(copy, sharded, llama_dir, tmp_path, capsys):
    other = split_datastore(sharded.shards[0].path, tmp_path / "other", 2)
    build_sharded_index(open_datastore(other), "Flat", progress=False)
    shutil.rmtree(copy / "indexes")
    shutil.copytree(other / "indexes", copy / "indexes")
    text = tmp_path / "t.txt"
    text.write_text(TEXT[:200])
    err = fails(capsys, ["eval", text, "-d", copy, "-k", "4", *model_args(llama_dir), *WINDOWS])
    assert "was built for datastore" in err


@pytest.mark.parametrize("seed", range(6))
def test_merge_equals_a_sort_of_all_candidates_by_distance_then_id(seed):
    """The merge gives the k smallest candidates by distance, then id: ties, negative and zero
    distances (rounding of PQ sums), inf padding with id -1, lists shorter than k and ids past
    32 bits included."""
    from knnlm.scale.search import merge_topk

    rng = np.random.default_rng(seed)
    m, k = 9, 12
    widths = [int(w) for w in rng.integers(1, 16, 3)]
    big = 1 << 33 if seed == 5 else 0
    dists = [rng.choice(np.array([-1e-6, -0.0, 0.0, 0.5, 1.0, 1.0, 2.5, 1e30, np.inf], np.float32), (m, w))
             for w in widths]
    ids = [rng.integers(0, 1000, (m, w)) + big for w in widths]
    for d, i in zip(dists, ids):
        i[np.isinf(d)] = -1
    got_d, got_i = merge_topk(dists, ids, k)
    d, i = np.concatenate(dists, 1), np.concatenate(ids, 1)
    if d.shape[1] < k:
        d = np.pad(d, ((0, 0), (0, k - d.shape[1])), constant_values=np.inf)
        i = np.pad(i, ((0, 0), (0, k - i.shape[1])), constant_values=-1)
    order = np.lexsort((i, d + 0.0), axis=-1)[:, :k]  # (+ 0.0: -0.0 and 0.0 are equal distances)
    np.testing.assert_array_equal(got_d, np.take_along_axis(d, order, 1))
    np.testing.assert_array_equal(got_i, np.take_along_axis(i, order, 1))
