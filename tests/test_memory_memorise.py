"""Training an LM to memorise its text (the kNN-LM paper's implicit-memory analysis):
next-token CE only (alpha = 0) without targets, the final weights kept instead of the
best held-out ones, training on some documents only, stopping on a low train loss."""

import numpy as np
import pytest
import torch
from test_memory import SMALL, docs_ds, docs_targets  # noqa: F401  (module fixtures)

from knnlm.errors import KnnlmError
from knnlm.memory.decoder import MemoryDecoder
from knnlm.memory.train import TrainConfig, pieces, split_pieces, train_decoder

CE = dict(SMALL, alpha=0.0, heldout_unit="document", heldout=0.25)


def _train(lm, ds, targets, out, **kw):
    return MemoryDecoder.load(train_decoder(lm, ds.path, targets, out, layers=2, config=TrainConfig(**{**CE, **kw}),
                                            progress=False))


def _weights(mem):
    return mem.lm.model.state_dict()


def _same(a, b) -> bool:
    return all(torch.equal(p, q) for p, q in zip(_weights(a).values(), _weights(b).values()))


def test_ce_only_needs_no_targets(lm, docs_ds, docs_targets, tmp_path):  # noqa: F811
    """alpha = 0 without targets trains exactly as with targets (their KL weighs 0)."""
    a = _train(lm, docs_ds, None, tmp_path / "a", epochs=2)
    b = _train(lm, docs_ds, docs_targets.path, tmp_path / "b", epochs=2)
    assert _same(a, b)
    losses = [[(h["step"], x["loss"], x["ce"]) for h in m.meta["history"] for x in [h.get("train") or h["heldout"]]]
              for m in (a, b)]
    assert losses[0] == losses[1]  # the KL is measured (but weighs 0) with targets only
    assert a.meta["targets"] is None and a.meta["k"] is None and b.meta["k"] == 8
    with pytest.raises(KnnlmError, match="alpha = 0.5 needs p_kNN targets"):
        train_decoder(lm, docs_ds.path, None, tmp_path / "c", layers=1, config=TrainConfig(**{**CE, "alpha": 0.5}),
                      progress=False)
    assert not (tmp_path / "c").exists()


def test_keep_last_keeps_the_final_weights_past_a_rising_heldout_loss(lm, docs_ds, tmp_path):  # noqa: F811
    """Trained hard on one document, the held-out loss rises: "best" stops early and keeps
    an early step; "last" trains every step and keeps the final weights, which equal a run
    that measures (and so keeps) only its final step."""
    train_doc = sorted(set(range(len(docs_ds.docs))) - set(_held(docs_ds)))[:1]
    hard = dict(epochs=30, lr=3e-2, train_documents=train_doc, patience=2)
    best = _train(lm, docs_ds, None, tmp_path / "best", **hard)
    assert best.meta["stopped"] == "patience" and best.meta["best_step"] < best.meta["steps"] < 30
    last = _train(lm, docs_ds, None, tmp_path / "last", keep="last", **hard)
    assert last.meta["stopped"] == "steps" and last.meta["steps"] == 30 and last.meta["kept"] == "last"
    assert last.meta["best_step"] < 30 and last.meta["last_heldout"]["loss"] > last.meta["heldout"]["loss"]
    only_end = _train(lm, docs_ds, None, tmp_path / "end", max_steps=30, eval_every=10_000,
                      **{k: v for k, v in hard.items() if k != "patience"})
    assert only_end.meta["best_step"] == 30
    assert _same(last, only_end) and not _same(last, best)


def _held(ds) -> list[int]:
    cfg = TrainConfig(**CE)
    return split_pieces(pieces(ds.docs, cfg.seq_len, ds.count), ds.docs, cfg.heldout, "document", cfg.seed)[2].tolist()


def test_train_documents_restrict_training_not_the_heldout_split(lm, docs_ds, tmp_path):  # noqa: F811
    held = _held(docs_ds)
    rest = sorted(set(range(len(docs_ds.docs))) - set(held))
    some = rest[:2]
    mem = _train(lm, docs_ds, None, tmp_path / "m", epochs=1, train_documents=some)
    assert mem.meta["heldout_documents"] == held
    assert mem.meta["train_tokens_per_epoch"] == sum(int(docs_ds.docs[d, 1]) - 1 for d in some)
    everything = _train(lm, docs_ds, None, tmp_path / "all", epochs=1)
    assert everything.meta["train_tokens_per_epoch"] == sum(int(docs_ds.docs[d, 1]) - 1 for d in rest)
    with pytest.raises(KnnlmError, match=rf"train_documents \[{held[0]}\] are held out"):
        _train(lm, docs_ds, None, tmp_path / "x", train_documents=[held[0]])
    with pytest.raises(KnnlmError, match=r"train_documents \[99\] are not documents"):
        _train(lm, docs_ds, None, tmp_path / "y", train_documents=[rest[0], 99])
    with pytest.raises(KnnlmError, match="keep must be"):
        TrainConfig(keep="first")


def test_until_train_loss_stops_at_the_end_of_an_epoch(lm, docs_ds, tmp_path):  # noqa: F811
    high = _train(lm, docs_ds, None, tmp_path / "h", epochs=4, keep="last", until_train_loss=1e9)
    per_epoch = high.meta["steps"]
    assert high.meta["stopped"] == "train_loss" and per_epoch == -(-high.meta["train_pieces"] // CE["batch_size"])
    low = _train(lm, docs_ds, None, tmp_path / "l", epochs=4, keep="last", until_train_loss=1e-9)
    assert low.meta["stopped"] == "steps" and low.meta["steps"] == 4 * per_epoch
    epoch_means = [np.mean([h["train"]["loss"] for h in low.meta["history"]
                            if "train" in h and e * per_epoch < h["step"] <= (e + 1) * per_epoch]) for e in range(4)]
    t = float(epoch_means[1]) + 1e-6  # just above the second epoch's mean
    first = next(e for e, m in enumerate(epoch_means) if m < t)  # the second, unless the first was lower
    mid = _train(lm, docs_ds, None, tmp_path / "m", epochs=4, keep="last", until_train_loss=t)
    assert mid.meta["stopped"] == "train_loss" and mid.meta["steps"] == (first + 1) * per_epoch
    assert _same(mid, _train(lm, docs_ds, None, tmp_path / "n", max_steps=(first + 1) * per_epoch, epochs=4,
                             keep="last"))
