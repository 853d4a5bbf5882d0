"""λ read from the nearest neighbour's distance: used by default when a datastore recorded a
table (knnlm build tunes one), off with --lambda or --no-lambda-by-distance; a datastore
without one opens and scores as before."""

import shutil

import numpy as np
import pytest

from knnlm.core.datastore import Datastore
from knnlm.core.mix import Weight, mix_text
from knnlm.core.neighbor import DistanceLambda
from knnlm.core.scoring import perplexity
from knnlm.run.evaluate import evaluate
from knnlm.run.selftune import self_tune

KW = dict(index="flat", window=32, stride=16, batch_tokens=128, progress=False, k=8, temperature=2.0)


@pytest.fixture(scope="module")
def copies(datastore, tmp_path_factory):
    """Two copies of the tiny datastore: settings without a table (an old datastore) and with one."""
    root = tmp_path_factory.mktemp("nl")
    old, new = root / "old", root / "new"
    for p in (old, new):
        shutil.copytree(datastore.path, p)
    base = {"k": 8, "lambda": 0.3, "temperature": 2.0}
    Datastore(old).record_settings(dict(base))
    Datastore(new).record_settings({**base, "lambda_by_distance": {"edges": [1.0, 4.0], "lambdas": [0.8, 0.4, 0.05]}})
    return Datastore(old), Datastore(new)


def test_recorded_table_is_used_by_default(lm, corpus, copies):
    old, new = copies
    kw = {f: v for f, v in KW.items() if f not in ("k", "temperature")}
    plain = evaluate(lm, [corpus], old.path, **kw)
    tabled = evaluate(lm, [corpus], new.path, **kw)
    assert "lambda_by_distance" not in plain and tabled["lambda_by_distance"]["lambdas"] == [0.8, 0.4, 0.05]
    assert tabled["ppl_knnlm"] != plain["ppl_knnlm"]
    off = evaluate(lm, [corpus], new.path, lambda_by_distance=False, **kw)
    given = evaluate(lm, [corpus], new.path, lam=0.3, lambda_mode="adaptive", **kw)  # λ given: one λ for all
    assert off["ppl_knnlm"] == plain["ppl_knnlm"] == given["ppl_knnlm"]


def test_table_numbers(lm, corpus, copies):
    """evaluate's kNN-LM is core.mix with each position's base λ from the table of its nearest distance."""
    from knnlm.core.batching import plan_files
    from knnlm.core.index import Searcher
    from knnlm.run.evaluate import score_plan
    from knnlm.run.options import RetrievalSettings

    _, new = copies
    s = score_plan(lm, plan_files(lm, [corpus], 32, 16, 128), Searcher(new, "flat"),
                   retrieval=RetrievalSettings(k=8, temperature=2.0), progress=False)
    table = DistanceLambda((1.0, 4.0), (0.8, 0.4, 0.05))
    want = perplexity(mix_text(s.lm, s.knn[:, None], [Weight(0.3, adapt=True)], table(s.nearest)[:, None])[0])
    got = evaluate(lm, [corpus], new.path, **{f: v for f, v in KW.items() if f not in ("k", "temperature")})
    assert got["ppl_knnlm"] == pytest.approx(want, rel=1e-12)
    assert np.isfinite(s.nearest).all()


def test_self_tune_records_a_table(lm, tmp_path):
    """`knnlm build`'s tuning (leave-own-document-out) fits and records the table."""
    import json

    from tiny import TEXT

    from knnlm.core.datastore import build_datastore
    from knnlm.core.index import build_index

    sents = [x.strip() + "." for x in TEXT.split(".") if x.strip()]
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"title": f"d{i}", "text": x}) + "\n" for i, x in enumerate(sents)))
    build_datastore(lm, [corpus], tmp_path / "ds", window=32, stride=16, batch_tokens=128, progress=False)
    ds = Datastore(tmp_path / "ds")
    build_index(ds, "Flat", progress=False)
    settings = self_tune(lm, ds, sample_tokens=4096, k=16, batch_tokens=128, progress=False)
    table = DistanceLambda.from_dict(settings.get("lambda_by_distance"))
    assert table is not None and len(table.lams) > 1
    check = settings["lambda_table_heldout_ppl"]  # the LM's confidence read only where it helped held out
    assert table.reads_confidence == (check["distance_and_confidence"] < check["distance"])
    assert Datastore(ds.path).meta["settings"]["lambda_by_distance"] == table.as_dict()
    assert settings["ppl_knnlm_by_distance"] <= settings["ppl_knnlm"] + 1e-9  # fitted on the same positions


def test_a_table_with_the_lms_confidence_is_used_by_default(lm, corpus, copies, tmp_path):
    """A datastore whose table reads the LM's confidence: evaluate's kNN-LM is core.mix with
    each position's base λ from its nearest distance and the LM's log max p there (the one
    score_plan reads from the logits), and differs from the same table read at one confidence."""
    import torch

    from knnlm.core.batching import plan_files
    from knnlm.core.index import Searcher
    from knnlm.run.evaluate import score_plan
    from knnlm.run.options import RetrievalSettings

    _, new = copies
    path = tmp_path / "conf"
    shutil.copytree(new.path, path)
    plan = plan_files(lm, [corpus], 32, 16, 128)
    s = score_plan(lm, plan, Searcher(new, "flat"), retrieval=RetrievalSettings(k=8, temperature=2.0), progress=False)
    want_max = np.full(len(s.lm), np.nan)
    for b in range(len(plan.batches)):  # each scored position's log max p, from the LM's logits
        _, logits = lm.forward(plan.batch_input(b), [], logits=True)
        for row, c0, c1, t in plan.scored(b):
            want_max[t : t + c1 - c0] = torch.log_softmax(logits[row, c0:c1].float(), -1).max(-1).values.numpy()
    np.testing.assert_allclose(s.lm_max, want_max, atol=1e-5)
    edges = np.quantile(s.lm_max, [0.5]).tolist()
    table = DistanceLambda((1.0, 4.0), ((0.9, 0.5), (0.6, 0.2), (0.3, 0.0)), tuple(edges))
    Datastore(path).record_settings({"k": 8, "lambda": 0.3, "temperature": 2.0, "lambda_by_distance": table.as_dict()})
    got = evaluate(lm, [corpus], path, **{f: v for f, v in KW.items() if f not in ("k", "temperature")})
    assert got["lambda_by_distance"]["confidence_edges"] == edges
    want = perplexity(mix_text(s.lm, s.knn[:, None], [Weight(0.3, adapt=True)], table(s.nearest, s.lm_max)[:, None])[0])
    one = perplexity(mix_text(s.lm, s.knn[:, None], [Weight(0.3, adapt=True)],
                              table(s.nearest, np.full(len(s.lm), -99.0))[:, None])[0])
    assert got["ppl_knnlm"] == pytest.approx(want, rel=1e-12) and want != pytest.approx(one, rel=1e-6)
