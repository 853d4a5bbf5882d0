"""Datastores that tune themselves: settings recorded at build time (leave-own-document-out),
used by every command when no option is given, overridden by options."""

import json
import logging
import shutil

import numpy as np
import pytest

import knnlm.core.settings
from knnlm.cli.main import main
from knnlm.core.datastore import Datastore
from knnlm.core.index import EXCLUDE_RADIUS, Searcher
from knnlm.core.settings import PAPER, resolve
from knnlm.run.generate import KNNLM
from knnlm.run.selftune import piece_plan, sample_pieces, self_tune

WINDOWS = ["--window", "32", "--stride", "16", "--batch-tokens", "128"]
TUNED = {"k": 4, "lambda": 0.4, "temperature": 2.0, "how": "test"}


def run(capsys, argv) -> str:
    code = main(["-q", *map(str, argv)])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def model_args(model_dir) -> list[str]:
    return ["--model", str(model_dir), "--dtype", "float32", "--device", "cpu"]


@pytest.fixture
def tuned_copy(datastore, tmp_path):
    """A copy of the session datastore with TUNED recorded."""
    path = tmp_path / "ds"
    shutil.copytree(datastore.path, path)
    Datastore(path).record_settings(dict(TUNED))
    return path


def test_resolve_order():
    """explicit option > --paper-defaults > the datastore's settings > the paper's."""
    meta = {"settings": TUNED}
    assert resolve(meta).as_dict() == {"k": 4, "lambda": 0.4, "lambda_mode": "adaptive", "temperature": 2.0,
                                       "settings_source": "datastore"}
    assert resolve(meta, lam=0.1).lam == 0.1 and resolve(meta, lam=0.1).k == 4
    assert (resolve(meta, paper=True).k, resolve(meta, paper=True).lam) == (PAPER["k"], PAPER["lambda"])
    assert resolve({}, count=10).as_dict() == {"k": 10, "lambda": 0.25, "lambda_mode": "adaptive", "temperature": 1.0,
                                               "settings_source": "paper"}
    assert resolve(meta, k=8, lam=0.0, temperature=1.0).source == "explicit"


def test_sample_pieces_cover_each_target_once():
    """Docs of 5 and 2050 tokens: the pieces predict 4 + 2049 targets, each once."""
    docs = np.array([[0, 5, 0], [5, 2050, 4]])
    pieces = sample_pieces(docs, 10**9)
    assert pieces == [(0, 0, 5), (1, 0, 1025), (1, 1024, 2049), (1, 2048, 2050)]
    assert sum(e - s - 1 for _, s, e in pieces) == 4 + 2049


def test_each_query_excludes_its_own_entry_whose_value_is_the_target(lm, datastore):
    pieces = sample_pieces(datastore.docs, 10**9)
    plan, own = piece_plan(datastore, pieces)
    assert np.array_equal(datastore.vals[own], plan.targets())  # own entry = that very corpus token
    keys = np.asarray(datastore.keys[own], dtype=np.float32)  # the stored keys of those positions
    d, i = Searcher(datastore).search(keys, 4, exclude=own)
    assert not (i == own[:, None]).any()  # never itself
    doc = datastore.document_of(i)
    assert not ((doc == datastore.document_of(own)[:, None]) & (np.abs(i - own[:, None]) < EXCLUDE_RADIUS)).any()


def test_build_records_settings_that_eval_uses(capsys, corpus, llama_dir, tmp_path):
    out = tmp_path / "ds"
    text = run(capsys, ["build", corpus, "-o", out, *model_args(llama_dir), *WINDOWS, "--index", "Flat"])
    assert "tuned on" in text
    s = Datastore(out).settings
    assert s is not None and s["how"].startswith("leave-own-document-out") and s["tokens"] > 0
    assert s["ppl_knnlm"] <= s["ppl_lm"] + 1e-9  # the grid holds lambda = 0: never worse on the sample
    info = run(capsys, ["info", out])
    assert f"k={s['k']} lambda={s['lambda']} T={s['temperature']}" in info
    res_file = tmp_path / "r.json"
    run(capsys, ["eval", corpus, "-d", out, *model_args(llama_dir), *WINDOWS, "-o", res_file])
    res = json.loads(res_file.read_text())
    assert (res["k"], res["lambda"], res["temperature"], res["settings_source"]) == (
        s["k"], s["lambda"], s["temperature"], "datastore")


def test_options_override_and_paper_defaults(capsys, corpus, llama_dir, tuned_copy, tmp_path):
    res_file = tmp_path / "r.json"
    base = ["eval", corpus, "-d", tuned_copy, *model_args(llama_dir), *WINDOWS, "-o", res_file]
    run(capsys, base)
    res = json.loads(res_file.read_text())
    assert (res["k"], res["lambda"], res["temperature"]) == (4, 0.4, 2.0)
    tuned_ppl = res["ppl_knnlm"]
    run(capsys, base + ["--lambda", "0.1"])
    res = json.loads(res_file.read_text())
    assert (res["k"], res["lambda"], res["temperature"]) == (4, 0.1, 2.0) and res["ppl_knnlm"] != tuned_ppl
    run(capsys, base + ["--paper-defaults"])
    res = json.loads(res_file.read_text())
    n = Datastore(tuned_copy).count
    assert (res["k"], res["lambda"], res["temperature"], res["settings_source"]) == (min(1024, n), 0.25, 1.0, "paper")


def test_old_datastore_without_settings_opens_with_the_papers_and_a_hint(capsys, corpus, llama_dir, datastore,
                                                                          tmp_path, caplog, monkeypatch):
    assert datastore.settings is None  # the fixture is built without tuning, as before this existed
    monkeypatch.setattr(knnlm.core.settings, "_hinted", set())  # the hint comes once a process: other tests use it
    res_file = tmp_path / "r.json"
    with caplog.at_level(logging.WARNING):
        run(capsys, ["eval", corpus, "-d", datastore.path, *model_args(llama_dir), *WINDOWS, "-o", res_file,
                     "-k", "8"])
    res = json.loads(res_file.read_text())
    assert (res["k"], res["lambda"], res["temperature"], res["settings_source"]) == (8, 0.25, 1.0, "paper")
    assert "--save" in caplog.text


def test_tune_save_records_the_best_setting(capsys, corpus, llama_dir, tuned_copy, tmp_path):
    out = tmp_path / "tune.json"
    run(capsys, ["tune", corpus, "-d", tuned_copy, *model_args(llama_dir), *WINDOWS, "-o", out, "-k", "8",
                 "--save"])
    best = json.loads(out.read_text())["best"]
    s = Datastore(tuned_copy).settings
    assert (s["k"], s["lambda"], s["temperature"]) == (best["k"], best["lambda"], best["temperature"])
    assert s["how"] == "knnlm tune on held-out text"


def test_knnlm_api_uses_the_datastore_settings(lm, tuned_copy):
    knn = KNNLM(lm, {"ds": tuned_copy})
    r = knn.retrieval()
    assert (r.k, r.lam, r.temperature) == (4, 0.4, 2.0)
    r = knn.retrieval(lam=0.5, k=2)
    assert (r.k, r.lam, r.temperature) == (2, 0.5, 2.0)
    assert KNNLM(lm, {"ds": tuned_copy}, lam=0.3).retrieval().lam == 0.3
    assert KNNLM(lm, {"ds": tuned_copy}, paper_defaults=True).retrieval().lam == 0.25


def test_self_tune_records_what_it_returns(lm, datastore, tmp_path):
    path = tmp_path / "ds"
    shutil.copytree(datastore.path, path)
    ds = Datastore(path)
    s = self_tune(lm, ds, sample_tokens=64, k=16, batch_tokens=128, progress=False)
    recorded = dict(Datastore(path).settings)
    assert recorded.pop("datastore_version") == ds.version  # the version they were tuned on, added when recorded
    assert recorded == json.loads(json.dumps(s))
    assert s["k"] <= 16 and 0.0 <= s["lambda"] <= 1.0 and s["tokens"] >= 64


def test_cache_theta_option_defaults_to_the_record_and_overrides_it(capsys, corpus, llama_dir, tuned_copy, tmp_path):
    """`knnlm eval` without --cache-theta/--cache-size mixes the cache with the datastore's
    tuned θ and size (also with a λ given: fixed, so that θ shows in the perplexity);
    --cache-theta given overrides the record (the size stays recorded)."""
    Datastore(tuned_copy).record_settings({**TUNED, "cache_lambda": 0.3, "cache_theta": 0.5, "cache_size": 12})
    res_file = tmp_path / "r.json"
    base = ["eval", corpus, "-d", tuned_copy, *model_args(llama_dir), *WINDOWS, "-o", res_file]
    out = run(capsys, base)
    res = json.loads(res_file.read_text())
    assert (res["cache_theta"], res["cache_size"], res["cache_lambda"]) == (0.5, 12, 0.3) and "theta=0.5" in out
    base += ["--cache-lambda", "0.3"]
    run(capsys, base)
    res = json.loads(res_file.read_text())
    assert (res["cache_theta"], res["cache_size"], res["cache_lambda_mode"]) == (0.5, 12, "fixed")
    run(capsys, base + ["--cache-theta", "0.05"])
    over = json.loads(res_file.read_text())
    assert (over["cache_theta"], over["cache_size"]) == (0.05, 12) and over["ppl"] != res["ppl"]
    run(capsys, base + ["--cache-size", "2000"])
    assert json.loads(res_file.read_text())["cache_size"] == 2000


def test_explain_uses_the_recorded_cache_theta(capsys, corpus, llama_dir, tuned_copy):
    """`knnlm explain` mixes the cache with the datastore's tuned θ and size: its report is the
    one with them given, and another with the default θ given."""
    Datastore(tuned_copy).record_settings({**TUNED, "cache_lambda": 0.3, "cache_theta": 0.5, "cache_size": 12})
    base = ["explain", corpus, "-d", tuned_copy, *model_args(llama_dir), *WINDOWS, "--cache-lambda", "0.3"]
    recorded = run(capsys, base)
    assert recorded == run(capsys, base + ["--cache-theta", "0.5", "--cache-size", "12"])
    assert recorded != run(capsys, base + ["--cache-theta", "0.05", "--cache-size", "12"])
