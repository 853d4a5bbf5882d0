"""A memory decoder's λ: tuned on its held-out text when trained and recorded; commands use
it, adapting to the text; a decoder that does not help (λ = 0) is the LM; an old decoder
without a recorded λ gets the default and a one-line hint."""

import json
import logging
import shutil

import pytest
from tiny import TEXT

from knnlm import RetrievalSettings
from knnlm.core.datastore import Datastore, build_datastore
from knnlm.core.index import build_index
from knnlm.memory.targets import TargetSettings, build_targets
from knnlm.memory.train import TrainConfig, train_decoder
from knnlm.run.evaluate import evaluate
from knnlm.run.generate import KNNLM

KW = dict(window=32, stride=16, batch_tokens=128, progress=False)


@pytest.fixture(scope="module")
def mem_dir(lm, tmp_path_factory):
    sents = [s.strip() + "." for s in TEXT.split(".") if s.strip()]
    root = tmp_path_factory.mktemp("memlam")
    p = root / "docs.jsonl"
    p.write_text("".join(json.dumps({"title": f"d{i}", "text": s}) + "\n" for i, s in enumerate(sents)))
    build_datastore(lm, [p], root / "ds", window=32, stride=16, batch_tokens=128, progress=False)
    build_index(Datastore(root / "ds"), "Flat", progress=False)
    build_targets(root / "ds", root / "t", TargetSettings(keep=8), retrieval=RetrievalSettings(k=8, temperature=4.0),
                  progress=False)
    cfg = TrainConfig(batch_size=4, seq_len=16, heldout=0.3, heldout_unit="document", lr=3e-3, epochs=1)
    return train_decoder(lm, root / "ds", root / "t", root / "mem", layers=1, config=cfg, progress=False)


def _with_settings(mem_dir, tmp_path, settings):
    out = tmp_path / "mem"
    shutil.copytree(mem_dir, out)
    meta = json.loads((out / "memory.json").read_text())
    if settings is None:
        meta.pop("settings", None)
    else:
        meta["settings"] = settings
    (out / "memory.json").write_text(json.dumps(meta))
    return out


def test_training_records_a_tuned_lambda(lm, mem_dir, corpus):
    s = json.loads((mem_dir / "memory.json").read_text())["settings"]
    assert 0.0 <= s["lambda"] <= 1.0 and s["tokens"] > 0 and s["how"] == "held-out documents of its corpus"
    assert s["ppl_memory"] <= s["ppl_lm"] + 1e-9  # the best λ on that text, 0 included
    res = evaluate(lm, [corpus], memory=mem_dir, **KW)
    assert res["memory_lambda"] == s["lambda"] and res["memory_lambda_mode"] == "adaptive"
    given = evaluate(lm, [corpus], memory=mem_dir, memory_lambda=0.3, **KW)
    assert given["memory_lambda"] == 0.3 and given["memory_lambda_mode"] == "fixed"


def test_a_decoder_that_does_not_help_is_the_lm(lm, mem_dir, corpus, tmp_path):
    off = _with_settings(mem_dir, tmp_path, {"lambda": 0.0, "how": "held-out documents of its corpus"})
    res = evaluate(lm, [corpus], memory=off, **KW)
    assert res["ppl_memory"] == res["ppl_lm"]
    knn = KNNLM(lm, memories={"mem": off})
    s = knn.score(TEXT[:80])
    assert [t.logprob for t in s.tokens] == [t.logprob_lm for t in s.tokens]


def test_an_old_decoder_gets_the_default_and_one_hint(lm, mem_dir, corpus, tmp_path, caplog):
    old = _with_settings(mem_dir, tmp_path, None)
    with caplog.at_level(logging.WARNING):
        a = evaluate(lm, [corpus], memory=old, **KW)
        b = evaluate(lm, [corpus], memory=old, **KW)
    hints = [r for r in caplog.records if "has no tuned lambda" in r.getMessage()]
    assert len(hints) == 1 and "\n" not in hints[0].getMessage()
    assert a["memory_lambda"] == 0.25 and a["memory_lambda_mode"] == "adaptive"
    assert b["ppl_memory"] == a["ppl_memory"]


def test_adaptive_decoder_is_never_far_worse_than_the_lm(lm, mem_dir, corpus, tmp_path):
    """Even at a bad recorded λ (0.9) the adaptive default loses at most log(1/w0) nats over
    the text to the LM (knnlm.core.mix)."""
    import math

    from knnlm.core.mix import candidates

    bad = _with_settings(mem_dir, tmp_path, {"lambda": 0.9})
    res = evaluate(lm, [corpus], memory=bad, **KW)
    n = res["tokens"]
    loss = n * (math.log(res["ppl_memory"]) - math.log(res["ppl_lm"]))  # nats over the text
    assert loss <= -math.log(candidates(0.9)[1][0]) + 1e-6
