"""Live edits of a served datastore (knnlm.serve.edits): refused without API keys, applied
without a restart, and a request never sees a partial edit."""

import json
import shutil
import threading

import httpx
import pytest
from test_edit import BUILD, DOCS, GONE, write_docs

from knnlm.core.datastore import Datastore, build_datastore
from knnlm.core.index import build_index
from knnlm.run.generate import KNNLM
from knnlm.serve.server import create_app
from knnlm.serve.server import serve_in_thread as running

KEY = {"Authorization": "Bearer k3y"}


@pytest.fixture
def served(lm, tmp_path):
    """A server with API keys over a datastore of documents 0..4 (document 5 is added live)."""
    path = build_datastore(lm, [write_docs(tmp_path / "d.jsonl", range(5))], tmp_path / "ds", **BUILD)[0]
    build_index(Datastore(path), "Flat", progress=False)
    knn = KNNLM(lm, {"docs": path})
    with running(create_app(knn, api_keys=["k3y"])) as url:
        yield url, path


def score(url, text):
    r = httpx.post(url + "/v1/score", json={"text": text, "datastore": "docs", "lambda": 0.5, "k": 8,
                                            "return_neighbors": 1}, headers=KEY, timeout=60).json()
    return r["ppl"], [d["title"] for d in r["documents"]]


def test_edits_refused_without_a_key(served, lm, tmp_path):
    url, path = served
    before = (path / "meta.json").read_text()
    r = httpx.post(url + "/v1/datastores/docs/remove", json={"documents": [GONE]})
    assert r.status_code == 401
    r = httpx.post(url + "/v1/datastores/docs/add", json={"documents": [{"text": DOCS[5]}]},
                   headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    open_path = tmp_path / "open"
    shutil.copytree(path, open_path)
    with running(create_app(KNNLM(lm, {"docs": open_path}))) as open_url:  # no API keys at all
        r = httpx.post(open_url + "/v1/datastores/docs/remove", json={"documents": [GONE]})
        assert r.status_code == 403 and "API keys" in r.json()["error"]["message"]
    assert (path / "meta.json").read_text() == before == (open_path / "meta.json").read_text()


def test_remove_and_add_live(served):
    url, path = served
    ppl0, titles = score(url, DOCS[GONE])
    assert titles[0] == f"doc{GONE}"
    r = httpx.post(url + "/v1/datastores/docs/remove", json={"titles": [f"doc{GONE}"], "dry_run": True}, headers=KEY)
    assert [d["document"] for d in r.json()["documents"]] == [GONE] and Datastore(path).version == 0
    r = httpx.post(url + "/v1/datastores/docs/remove", json={"documents": [GONE]}, headers=KEY).json()
    assert r["edit"]["op"] == "remove" and r["datastore"]["version"] == 1
    ppl1, titles = score(url, DOCS[GONE])
    assert f"doc{GONE}" not in titles and ppl1 > ppl0
    r = httpx.post(url + "/v1/datastores/docs/remove", json={"documents": [99]}, headers=KEY)
    assert r.status_code == 400 and "no document 99" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/datastores/docs/add", json={"documents": [{"title": "new", "text": DOCS[5]}]},
                   headers=KEY).json()
    assert r["edit"]["op"] == "add" and r["datastore"]["version"] == 2
    assert score(url, DOCS[5])[1][0] == "new"
    info = httpx.get(url + "/v1/datastores/docs", headers=KEY).json()
    assert info["removed"] == [GONE] and [e["op"] for e in info["edits"]] == ["remove", "add"]


def test_requests_during_edits_see_before_or_after(served):
    """Scores of one text requested without pause while the datastore is edited (an addition,
    then a removal): each equals the score of one version, never anything between."""
    url, _ = served
    before, _ = score(url, DOCS[GONE])
    seen, stop = [], threading.Event()

    def hammer():
        while not stop.is_set():
            seen.append(score(url, DOCS[GONE])[0])

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    httpx.post(url + "/v1/datastores/docs/add", json={"documents": [{"text": DOCS[5]}]}, headers=KEY, timeout=60)
    added, _ = score(url, DOCS[GONE])
    httpx.post(url + "/v1/datastores/docs/remove", json={"documents": [GONE]}, headers=KEY, timeout=60)
    after, _ = score(url, DOCS[GONE])
    stop.set()
    for t in threads:
        t.join()
    states = (before, added, after)  # the versions 0, 1 (document 5 added) and 2 (document 2 removed)
    assert len(set(states)) == 3 and len(seen) > 3
    assert all(any(p == pytest.approx(v, abs=1e-9) for v in states) for p in seen), (states, sorted(set(seen)))
    assert json.loads((Datastore(served[1]).path / "meta.json").read_text())["version"] == 2
