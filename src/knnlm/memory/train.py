"""Train a memory decoder to imitate a datastore's p_kNN on the datastore's own corpus.

Each document of the corpus is cut into pieces of `seq_len` predicted tokens (the context
of a position is its piece so far).  A seeded share of the pieces is held out; the rest
are visited in a seeded order each epoch, `batch_size` pieces a step, with AdamW on
alpha * KL(p_kNN || p_mem) + (1 - alpha) * CE.  The held-out loss is measured every
`eval_every` steps; the best weights so far are the result, and training stops after
`patience` measurements without improvement.  With `keep="last"` the final weights are
the result instead (held-out still measured, for the record; no early stopping): an LM
trained to memorise its text.  `train_documents` restricts training to some documents
(the held-out split is drawn over all of them first, so it is the same either way);
`until_train_loss` stops at the end of the first epoch whose mean train loss is below it.
With alpha = 0 (next-token CE only) no targets are needed.

Everything is written under `<out>.partial/`: `checkpoint.pt` (weights, optimizer,
step, history) after every `save_every` steps, at every measurement and on Ctrl-C, and
`best/` (the best weights).  Running the same command again resumes from the
checkpoint: the data order and each step's random state depend only on the seed and the
step number, so a resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from knnlm.core.datastore import publish
from knnlm.errors import KnnlmError
from knnlm.memory.decoder import META, init_decoder, num_layers, save_decoder
from knnlm.memory.loss import DEFAULT_ALPHA, check_alpha, memory_loss
from knnlm.memory.targets import Targets, open_corpus_datastore

LOG = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    alpha: float = DEFAULT_ALPHA
    lr: float = 1e-3
    weight_decay: float = 0.01
    epochs: int = 1
    max_steps: int | None = None  # stop after this many steps in all (None: the epochs)
    batch_size: int = 8  # pieces per step
    seq_len: int = 256  # predicted tokens per piece
    heldout: float = 0.02  # share of the pieces (or documents) held out for early stopping
    heldout_unit: str = "piece"  # "piece", or "document": whole documents held out (none in both parts)
    eval_every: int | None = None  # steps between held-out measurements (None: once per epoch)
    patience: int = 3  # measurements without improvement before stopping
    max_seconds: float | None = None  # training time budget (resumed runs count from the start); the best so far
    # is the result.  Not part of a run's identity: a run resumed with another budget goes on where it stopped.
    save_every: int = 50  # steps between checkpoints
    seed: int = 0
    autocast: str = "none"  # "bfloat16": bfloat16 autocast for speed on CPUs that have it
    keep: str = "best"  # "best": the best held-out measurement's weights (early stopping); "last": the final ones
    train_documents: list[int] | None = None  # train on these documents only (None: all not held out)
    until_train_loss: float | None = None  # stop after the first epoch whose mean train loss is below this.
    # Like max_seconds, not part of a run's identity.

    def __post_init__(self):
        check_alpha(self.alpha)
        for name in ("epochs", "batch_size", "seq_len", "patience", "save_every"):
            if getattr(self, name) < 1:
                raise KnnlmError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise KnnlmError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.max_seconds is not None and self.max_seconds < 0:
            raise KnnlmError(f"max_seconds must be >= 0, got {self.max_seconds}")
        if self.eval_every is not None and self.eval_every < 1:
            raise KnnlmError(f"eval_every must be >= 1, got {self.eval_every}")
        if not 0.0 <= self.heldout < 1.0:
            raise KnnlmError(f"heldout must be in [0, 1), got {self.heldout}")
        if not self.lr > 0:
            raise KnnlmError(f"lr must be > 0, got {self.lr}")
        if self.heldout_unit not in ("piece", "document"):
            raise KnnlmError(f"heldout_unit must be 'piece' or 'document', got {self.heldout_unit!r}")
        if self.autocast not in ("none", "bfloat16"):
            raise KnnlmError(f"autocast must be 'none' or 'bfloat16', got {self.autocast!r}")
        if self.keep not in ("best", "last"):
            raise KnnlmError(f"keep must be 'best' or 'last', got {self.keep!r}")
        if self.train_documents is not None:
            self.train_documents = sorted({int(d) for d in self.train_documents})
            if not self.train_documents:
                raise KnnlmError("train_documents is empty")
        if self.until_train_loss is not None and not self.until_train_loss > 0:
            raise KnnlmError(f"until_train_loss must be > 0, got {self.until_train_loss}")


def pieces(docs: np.ndarray, seq_len: int, count: int) -> np.ndarray:
    """(P, 3) int64 pieces: first token, first entry, predicted tokens (<= seq_len), cut
    from each document (docs rows: token start, token count, first entry); only entries
    below `count` (the targets computed) are used.

    A document of 6 tokens (5 entries) with seq_len 2 gives pieces at offsets 0, 2, 4 of
    2, 2 and 1 predicted tokens: inputs t0 t1 | t2 t3 | t4, predicting t1 t2 | t3 t4 | t5.
    """
    out = []
    for start, n, entry in np.asarray(docs, dtype=np.int64):
        for a in range(0, int(n) - 1, seq_len):
            m = min(seq_len, int(n) - 1 - a, count - int(entry) - a)
            if m > 0:
                out.append((start + a, entry + a, m))
    return np.array(out, dtype=np.int64).reshape(-1, 3)


def doc_of(all_pieces: np.ndarray, docs: np.ndarray) -> np.ndarray:
    """(P,) the document of each piece: the one whose token range holds its first token."""
    starts = np.asarray(docs, dtype=np.int64)[:, 0]
    return np.searchsorted(starts, all_pieces[:, 0], side="right") - 1


def split_pieces(all_pieces: np.ndarray, docs: np.ndarray, heldout: float, unit: str = "piece",
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(held-out pieces, training pieces, held-out document numbers): a seeded share
    `heldout` of the pieces, or with unit "document" of the documents (all their pieces;
    the held-out text is then text the model never trains on, for tuning λ on it).
    docs are the (D, 3) rows `pieces` was cut from; a piece's document is the one whose
    token range holds its first token.  Held-out document numbers are empty for "piece"."""
    n = len(all_pieces)
    if unit == "document":
        of = doc_of(all_pieces, docs)  # (P,)
        present = np.unique(of)
        n_held = int(round(heldout * len(present))) if len(present) > 1 else 0
        if heldout > 0 and len(present) > 1:
            n_held = max(1, n_held)
        held_docs = np.sort(np.random.default_rng(seed).permutation(present)[:n_held])
        is_held = np.isin(of, held_docs)
        return all_pieces[is_held], all_pieces[~is_held], held_docs
    order = np.random.default_rng(seed).permutation(n)
    n_held = int(round(heldout * n)) if n > 1 else 0
    if heldout > 0 and n > 1:
        n_held = max(1, n_held)
    return all_pieces[np.sort(order[:n_held])], all_pieces[np.sort(order[n_held:])], np.zeros(0, np.int64)


class _Data:
    """Batches of pieces as tensors: inputs (B, L), next tokens, sparse targets, a mask.
    Without targets (alpha = 0: CE only) every position has none (ids -1)."""

    def __init__(self, tokens: np.ndarray, targets: Targets | None, seq_len: int):
        self.tokens, self.targets, self.seq_len = tokens, targets, seq_len

    def batch(self, rows: np.ndarray):
        b, length = len(rows), int(rows[:, 2].max())
        x = np.zeros((b, length), dtype=np.int64)
        y = np.zeros((b, length), dtype=np.int64)
        mask = np.zeros((b, length), dtype=bool)
        keep = self.targets.keep if self.targets is not None else 1
        tid = np.full((b, length, keep), -1, dtype=np.int64)
        tp = np.zeros((b, length, keep), dtype=np.float32)
        for r, (t0, e0, m) in enumerate(rows):
            x[r, :m] = self.tokens[t0 : t0 + m]
            y[r, :m] = self.tokens[t0 + 1 : t0 + m + 1]
            mask[r, :m] = True
            if self.targets is not None:
                tid[r, :m], tp[r, :m] = self.targets.ids[e0 : e0 + m], self.targets.probs[e0 : e0 + m]
        t = torch.from_numpy
        return t(x), t(y), t(mask), t(tid), t(tp)


def _loss(model, data: _Data, rows: np.ndarray, alpha: float, autocast: str):
    x, y, mask, tid, tp = data.batch(rows)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast == "bfloat16"):
        logits = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits  # (B, L, V)
    return memory_loss(logits[mask], y[mask], tid[mask], tp[mask], alpha)


@torch.no_grad()
def heldout_loss(model, data: _Data, rows: np.ndarray, cfg: TrainConfig) -> dict:
    model.eval()
    tot = {"loss": 0.0, "kl": 0.0, "ce": 0.0}
    n = 0
    for i in range(0, len(rows), cfg.batch_size):
        part = rows[i : i + cfg.batch_size]
        w = int(part[:, 2].sum())
        for key, v in zip(tot, _loss(model, data, part, cfg.alpha, cfg.autocast)):
            tot[key] += float(v) * w
        n += w
    model.train()
    return {key: round(v / max(n, 1), 6) for key, v in tot.items()}


def _save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def train_decoder(
    lm,
    datastore: str | Path,
    targets: str | Path | None,
    out: str | Path,
    layers: int = 2,
    init_model: str | None = None,
    config: TrainConfig | None = None,
    overwrite: bool = False,
    progress: bool = True,
    on_step: Callable[[int, dict], None] | None = None,
) -> Path:
    """Train a memory decoder for `lm` (the datastore's model) on the datastore's corpus and
    the sparse p_kNN `targets` computed from it (None with alpha = 0: CE only); returns the
    decoder directory."""
    from tqdm.auto import tqdm

    cfg = config or TrainConfig()
    out = Path(out)
    if out.exists() and not overwrite:
        raise KnnlmError(f"{out} already exists (use --overwrite to replace it)")
    if init_model is None and not 1 <= layers <= num_layers(lm.model):
        raise KnnlmError(f"a memory decoder of L={layers} layers cannot be cut from {lm.name}, which has "
                         f"{num_layers(lm.model)}")
    ds = open_corpus_datastore(datastore)
    ds.check_compatible(lm.identity(ds.key_point))
    if targets is None:
        if cfg.alpha != 0:
            raise KnnlmError(f"training with alpha = {cfg.alpha} needs p_kNN targets (only alpha = 0, next-token CE, "
                             "trains without)")
        tg = None
    else:
        tg = Targets(targets)
        tg.check_for(ds)
    all_pieces = pieces(ds.docs, cfg.seq_len, tg.count if tg is not None else ds.count)
    if len(all_pieces) == 0:
        raise KnnlmError(f"no position of {ds.path} has targets in {tg.path}" if tg is not None
                         else f"{ds.path} has no tokens to train on")
    if ds.removed is not None:  # documents removed from the datastore are not trained on (nor held out)
        all_pieces = all_pieces[~np.isin(doc_of(all_pieces, ds.docs), ds.removed_documents)]
    held, train, held_docs = split_pieces(all_pieces, ds.docs, cfg.heldout, cfg.heldout_unit, cfg.seed)
    if cfg.train_documents is not None:
        wanted = np.asarray(cfg.train_documents, dtype=np.int64)
        bad_docs = wanted[(wanted < 0) | (wanted >= len(ds.docs))]
        if len(bad_docs):
            raise KnnlmError(f"train_documents {bad_docs[:5].tolist()} are not documents of {ds.path} "
                             f"(0..{len(ds.docs) - 1})")
        if cfg.heldout_unit == "document" and np.isin(wanted, held_docs).any():
            raise KnnlmError(f"train_documents {wanted[np.isin(wanted, held_docs)][:5].tolist()} are held out")
        train = train[np.isin(doc_of(train, ds.docs), wanted)]
        if len(train) == 0:
            raise KnnlmError("no training piece left in train_documents")
    per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, per_epoch * cfg.epochs)
    eval_every = cfg.eval_every or per_epoch
    data = _Data(np.asarray(ds.tokens), tg, cfg.seq_len)

    same_run = {k: v for k, v in asdict(cfg).items() if k not in ("max_seconds", "until_train_loss")}
    tg_id = tg.meta["id"] if tg is not None else None
    signature = json.loads(json.dumps({"config": same_run, "datastore_id": ds.id, "targets_id": tg_id,
                                       "layers": layers, "init_model": init_model, "lm": lm.fingerprint}))
    partial = out.with_name(out.name + ".partial")
    ckpt_path = partial / "checkpoint.pt"
    state = None
    if ckpt_path.exists():
        try:
            state = torch.load(ckpt_path, weights_only=False)
        except Exception:  # a checkpoint cut short by a crash
            state = None
        if not isinstance(state, dict) or state.get("signature") != signature:
            LOG.warning("starting over: the unfinished training in %s had other input or settings", partial)
            state = None
        else:
            LOG.warning("resuming the training in %s from step %d/%d", partial, state["step"], total)
    if state is None and partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)

    model, tokenizer, how = init_decoder(lm, layers, init_model)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, best, bad, history, seconds = 0, None, 0, [], 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, best, bad, history, seconds = (state["step"], state["best"], state["bad"], state["history"],
                                             state["seconds"])

    def checkpoint():
        _save_checkpoint(ckpt_path, {"signature": signature, "model": model.state_dict(),
                                     "optimizer": opt.state_dict(), "step": step, "best": best, "bad": bad,
                                     "history": history, "seconds": seconds + time.perf_counter() - t0})

    def measure():
        nonlocal best, bad
        h = heldout_loss(model, data, held, cfg) if len(held) else None
        entry = {"step": step, "heldout": h}
        history.append(entry)
        if h is None or best is None or h["loss"] < best["heldout"]["loss"]:
            best, bad = entry, 0
            if cfg.keep == "best":
                model.save_pretrained(partial / "best")
        elif cfg.keep == "best":
            bad += 1
        return h

    def low_train_loss():
        """The mean train loss of the epoch just ended is below until_train_loss."""
        if cfg.until_train_loss is None or step == 0 or step % per_epoch:
            return False
        losses = [h["train"]["loss"] for h in history if "train" in h and h["step"] > step - per_epoch]
        return float(np.mean(losses)) < cfg.until_train_loss

    def out_of_time():
        return cfg.max_seconds is not None and seconds + time.perf_counter() - t0 >= cfg.max_seconds

    bar = tqdm(total=total, initial=step, unit="step", desc="memory decoder", disable=not progress)
    t0 = time.perf_counter()
    try:
        while step < total and bad < cfg.patience and not out_of_time() and not low_train_loss():
            epoch, i = divmod(step, per_epoch)
            perm = np.random.default_rng([cfg.seed, epoch]).permutation(len(train))
            rows = train[np.sort(perm[i * cfg.batch_size : (i + 1) * cfg.batch_size])]
            torch.manual_seed(cfg.seed * 1_000_003 + step)  # dropout, if the model has any
            loss, kl, ce = _loss(model, data, rows, cfg.alpha, cfg.autocast)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            last = {"step": step, "loss": loss.item(), "kl": kl.item(), "ce": ce.item()}
            history.append({"step": step, "train": last})
            bar.set_postfix(kl=f"{last['kl']:.3f}", ce=f"{last['ce']:.3f}")
            bar.update(1)
            if step % eval_every == 0 or step == total:
                h = measure()
                if h is not None:
                    bar.set_postfix(kl=f"{last['kl']:.3f}", ce=f"{last['ce']:.3f}", heldout=f"{h['loss']:.3f}")
                checkpoint()
            elif step % cfg.save_every == 0:
                checkpoint()
            if on_step is not None:
                on_step(step, last)
    except KeyboardInterrupt:
        checkpoint()
        raise KnnlmError(f"interrupted at step {step}: the training is kept in {partial}; run the same command "
                         "to resume") from None
    finally:
        bar.close()
    stopped = ("patience" if bad >= cfg.patience else "steps" if step >= total
               else "train_loss" if low_train_loss() else "time")
    if cfg.keep == "last":
        if not any(h.get("step") == step and "heldout" in h for h in history):  # the kept weights, measured
            measure()
    elif not (partial / "best").exists():  # stopped before any measurement (a time budget spent early)
        measure()
    seconds += time.perf_counter() - t0
    train_losses = [h["train"] for h in history if "train" in h]
    meta = {
        "base_model": lm.name,
        "base_model_fingerprint": lm.fingerprint,
        "tokenizer_fingerprint": lm.tokenizer_fingerprint,
        **how,
        "datastore": str(ds.path),
        "datastore_id": ds.id,
        "datastore_version": ds.version,
        "datastore_removed": ds.removed_documents.tolist(),  # not trained on
        "corpora": ds.meta["corpora"],
        "tokens_sha256": ds.meta["sha256"].get("tokens.npy"),
        "targets": str(tg.path) if tg is not None else None,
        "targets_id": tg_id,
        **{f: tg.meta[f] if tg is not None else None for f in ("k", "temperature", "keep", "exclude")},
        "alpha": cfg.alpha,
        "config": asdict(cfg),
        "steps": step,
        "stopped": stopped,
        "kept": cfg.keep,
        "best_step": best["step"],  # the best held-out measurement (with keep "last" not the weights kept)
        "heldout": best["heldout"],
        "last_heldout": next((h["heldout"] for h in reversed(history) if "heldout" in h), None),
        "first_train": train_losses[0] if train_losses else None,
        "last_train": train_losses[-1] if train_losses else None,
        "history": history,
        "train_pieces": int(len(train)),
        "heldout_pieces": int(len(held)),
        "heldout_documents": [int(d) for d in held_docs],
        "train_tokens_per_epoch": int(train[:, 2].sum()),
        "seconds": round(seconds, 2),
    }
    from transformers import AutoModelForCausalLM

    if cfg.keep == "last":
        best_model = model.float()
    else:
        best_model = AutoModelForCausalLM.from_pretrained(partial / "best", dtype=torch.float32)
    from knnlm.memory.tune import tune_memory_lambda

    settings = tune_memory_lambda(lm, best_model, np.asarray(ds.tokens), held, cfg.heldout_unit)
    if settings is not None:
        meta["settings"] = settings  # the λ every command defaults to
    final = save_decoder(best_model, tokenizer, partial / "decoder", meta)
    publish(final, out)
    shutil.rmtree(partial)
    LOG.info("memory decoder %s: %d steps, best held-out loss %s at step %d", out, step,
             best["heldout"] and best["heldout"]["loss"], best["step"])
    return out


def read_history(path: str | Path) -> list[dict]:
    return json.loads((Path(path) / META).read_text())["history"]
