"""Perplexity of the base LM and of the kNN-LM on the same windows and tokens."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from knnlm.core.mix import Weight, mix_text
from knnlm.core.batching import Plan, plan_files
from knnlm.core.datastore import Datastore
from knnlm.core.index import Searcher
from knnlm.core.scoring import (
    cache_target_logprobs,
    knn_target_logprobs,
    perplexity,
)
from knnlm.core.settings import PAPER, cache_params, cache_weight, resolve
from knnlm.errors import KnnlmError
from knnlm.retrieval.adaptive import confidence
from knnlm.retrieval.pointers import simulate
from knnlm.run.continuous import CACHE_KEY_POINT  # noqa: F401  (the cache's keys: final hidden states)
from knnlm.run.options import (  # noqa: F401  (DEFAULT_CACHE_THETA: this module's name before options)
    DEFAULT_CACHE_SIZE,
    DEFAULT_CACHE_THETA,
    CacheSettings,
    MixSettings,
    RetrievalSettings,
    WindowSettings,
    fold,
)
from knnlm.scale import open_datastore, open_searcher

LOG = logging.getLogger(__name__)

DEFAULT_K = PAPER["k"]  # score_plan's k and T when called directly; commands resolve theirs (core.settings)
DEFAULT_TEMPERATURE = PAPER["temperature"]


@dataclass
class Scores:
    """Per-target results of one pass over a text, in text order."""

    plan: Plan
    targets: np.ndarray  # (n,) token ids
    lm: np.ndarray  # (n,) log p_LM(target)
    knn: np.ndarray | None = None  # (n,) log p_kNN(target) at the pass's k and temperature
    dists: np.ndarray | None = None  # (n, k) when neighbours are kept
    ids: np.ndarray | None = None  # (n, k) datastore entry ids
    vals: np.ndarray | None = None  # (n, k) the neighbours' tokens
    cache: np.ndarray | None = None  # (n,) log p_cache(target); NaN where the cache is empty
    cache_keys: np.ndarray | None = None  # (n, d) float32 final hidden states, when kept
    searched: np.ndarray | None = None  # (n,) bool: positions that searched (all of them without pointers/adaptive)
    memory: np.ndarray | None = None  # (n,) log p_mem(target) of a memory decoder
    nearest: np.ndarray | None = None  # (n,) the nearest neighbour's squared distance (NaN: not searched)
    lm_max: np.ndarray | None = None  # (n,) the LM's log max p at each position (its confidence)
    seconds: dict = field(default_factory=dict)


def score_plan(
    lm,
    plan: Plan,
    searcher: Searcher | None = None,
    memory=None,
    *,
    retrieval: RetrievalSettings | None = None,
    cache: CacheSettings | None = None,
    keep_neighbors: bool = False,
    keep_cache_keys: bool = False,
    exclude: np.ndarray | None = None,
    progress: bool = True,
    **flat,
) -> Scores:
    """One forward pass per batch: LM log-probs of every target and, with a searcher, the
    k nearest datastore entries of every query key.

    `retrieval`: k and the kNN temperature (None: the paper's), pointers and adaptive
    retrieval; the other fields are for opening the searcher and unused here.
    With `cache` (or `keep_cache_keys`) the same pass also reads the final hidden
    state of every position, the continuous cache's key: `Scores.cache` is then
    log p_cache(target) over the `cache.size` previous positions of the same document
    (θ and size left None: the defaults; callers with a datastore resolve them first).
    `exclude` (n,): each target's own datastore entry, left out of its search with its
    neighbourhood (leave-own-document-out, `Searcher.search`); for text from the datastore's corpus.

    With `pointers` (RetoMaton) or `adaptive` retrieval, the query keys are kept and the
    retrieval is replayed left to right per document after the pass (`simulate`: exact,
    since keys do not depend on retrieval); `Scores.knn` is NaN where a position skipped
    retrieval and `Scores.searched` says which positions searched.
    With a `memory` decoder (knnlm.memory.decoder.MemoryDecoder) the same windows also give
    `Scores.memory`, log p_mem(target).
    """
    import torch
    from tqdm.auto import tqdm

    from knnlm.core.model import target_logprobs  # torch: imported when a model runs, not with the CLI

    if "cache_theta" in flat or "cache_size" in flat:  # the flat signature: cache on iff cache_theta given
        theta, size = flat.pop("cache_theta", None), flat.pop("cache_size", None)
        cache = None if theta is None else CacheSettings(theta, size)
    retrieval = fold("score_plan", flat, retrieval=retrieval)
    k = DEFAULT_K if retrieval.k is None else retrieval.k
    temperature = DEFAULT_TEMPERATURE if retrieval.temperature is None else retrieval.temperature
    pointers, adaptive = retrieval.pointers, retrieval.adaptive
    cache_theta, cache_size = cache_params(None, cache.theta, cache.size) if cache is not None else (None, None)
    n = plan.count
    targets = plan.targets().astype(np.int64)
    lm_lp = np.empty(n, dtype=np.float32)
    lm_max = np.empty(n, dtype=np.float32)
    knn_lp = np.empty(n, dtype=np.float64) if searcher else None
    nearest = np.full(n, np.nan) if searcher else None
    if searcher is not None and k > searcher.ds.count:
        raise KnnlmError(f"k={k} is larger than the datastore ({searcher.ds.count} entries)")
    replay = searcher is not None and (pointers is not None or adaptive is not None)
    if replay and (keep_neighbors or exclude is not None):
        raise KnnlmError("pointers and adaptive retrieval keep no neighbours and exclude no entries")
    if replay:
        all_q = None  # (n, d) float32 query keys, allocated at the first batch
        skip = np.zeros(n, dtype=bool)
    if keep_neighbors and searcher is not None:
        dists = np.empty((n, k), dtype=np.float32)
        ids = np.empty((n, k), dtype=np.int64)
    kp = searcher.ds.key_point if searcher else None
    use_cache = cache_theta is not None or keep_cache_keys
    read = ([kp] if kp else []) + ([CACHE_KEY_POINT] if use_cache and kp != CACHE_KEY_POINT else [])
    ckeys = np.empty((n, lm.dim(CACHE_KEY_POINT)), dtype=np.float32) if use_cache else None
    t_lm = t_search = t_mem = 0.0
    mem_lp = np.empty(n, dtype=np.float32) if memory is not None else None
    bar = tqdm(total=n, unit="tok", desc="eval", disable=not progress)
    for b in range(len(plan.batches)):
        t0 = time.perf_counter()
        windows = list(plan.scored(b))
        first = min(c0 for _, c0, _, _ in windows)  # no logits needed before the first scored column
        keys, logits = lm.forward(plan.batch_input(b), read, logits=True, logits_from=first)
        rows, qs, spans = [], [], []
        for row, c0, c1, t in windows:
            rows.append(logits[row, c0 - first : c1 - first])
            if kp:
                qs.append(keys[kp][row, c0:c1])
            spans.append((t, t + c1 - c0))
        sel = np.concatenate([np.arange(a, z) for a, z in spans])
        if use_cache:
            h = [keys[CACHE_KEY_POINT][row, c0:c1] for row, c0, c1, _ in windows]
            ckeys[sel] = torch.cat(h).float().cpu().numpy()  # (m, d)
        lp, top = target_logprobs(torch.cat(rows), torch.from_numpy(targets[sel]).to(logits.device), with_max=True)
        lm_lp[sel], lm_max[sel] = lp.cpu().numpy(), top.cpu().numpy()
        t1 = time.perf_counter()
        t_lm += t1 - t0
        if replay:
            q = torch.cat(qs).float().cpu().numpy()  # (m, d)
            if all_q is None:
                all_q = np.empty((n, q.shape[1]), dtype=np.float32)
            all_q[sel] = q
            if adaptive is not None and adaptive.threshold is not None:
                max_lp, ent = confidence(torch.cat(rows))  # (m,) each: the LM's confidence, before any search
                skip[sel] = adaptive.skip(max_lp.cpu().numpy(), ent.cpu().numpy())
        elif getattr(searcher, "on_device", False) and not keep_neighbors and exclude is None:
            # search, re-rank and p_kNN on the model's device: only (m,) numbers come back
            t_sel = torch.from_numpy(targets[sel])
            lp, near = searcher.target_logprobs(torch.cat(qs), t_sel, k, temperature, with_nearest=True)
            knn_lp[sel], nearest[sel] = lp.cpu().numpy(), near.cpu().numpy()
            t_search += time.perf_counter() - t1
        elif searcher is not None:
            q = torch.cat(qs).float().cpu().numpy()  # (m, d)
            d, i = searcher.search(q, k, exclude=None if exclude is None else exclude[sel])
            v = searcher.ds.vals[np.maximum(i, 0)]
            lp = knn_target_logprobs(d, v, targets[sel], temperature, counts=searcher.ds.counts_of(i))
            lp[(i < 0).all(axis=1)] = np.nan  # no neighbour at all (an IVF probe found none): p_LM alone
            knn_lp[sel], nearest[sel] = lp, d[:, 0]
            if keep_neighbors:
                dists[sel], ids[sel] = d, i
            t_search += time.perf_counter() - t1
        if memory is not None:
            from knnlm.memory.decoder import window_target_logprobs

            t2 = time.perf_counter()
            mem_lp[sel] = window_target_logprobs(memory, plan.batch_input(b), windows, first, targets[sel])
            t_mem += time.perf_counter() - t2
        bar.update(len(sel))
    bar.close()
    searched = None
    if replay:
        t1 = time.perf_counter()
        run = simulate(all_q, targets, plan.docs[:, 2], searcher.ds.vals, searcher.ds,
                       lambda pos, q, kk: searcher.search(q, kk), searcher.exact, k, pointers, (temperature,),
                       skip=skip if skip.any() else None, progress=progress)
        knn_lp, searched, nearest = run.knn[:, 0], run.searched, run.nearest
        t_search += time.perf_counter() - t1
    elif searcher is not None:
        searched = np.ones(n, dtype=bool)
    out = Scores(plan, targets, lm_lp, knn_lp, seconds={"lm": t_lm, "knn": t_search, "memory": t_mem},
                 searched=searched, memory=mem_lp, nearest=nearest, lm_max=lm_max)
    if keep_neighbors and searcher is not None:
        out.dists, out.ids = dists, ids
        out.vals = searcher.ds.vals[np.maximum(ids, 0)]
    if cache_theta is not None:
        t0 = time.perf_counter()
        out.cache = cache_target_logprobs(ckeys, targets, plan.docs[:, 2], cache_theta, cache_size)
        out.seconds["cache"] = time.perf_counter() - t0
    if keep_cache_keys:
        out.cache_keys = ckeys
    return out


def open_for_model(lm, datastore: str | Path) -> Datastore:
    """A datastore (single or sharded) checked to be this model's; the model reads its key point."""
    ds = open_datastore(datastore)
    ds.check_compatible(lm.identity(ds.key_point))
    lm.key_point = ds.key_point
    return ds


def evaluate(
    lm,
    texts: Sequence[str | Path],
    datastore: str | Path | None = None,
    memory: str | Path | None = None,
    *,
    retrieval: RetrievalSettings | None = None,
    mixing: MixSettings | None = None,
    windows: WindowSettings | None = None,
    cache: CacheSettings | None = None,
    progress: bool = True,
    **flat,
) -> dict:
    """Perplexity of the LM and (with a datastore) the kNN-LM; a JSON-ready dict.

    The settings come in groups (knnlm.run.options); the flat keyword arguments of the
    command line's names (k=, lam=, window=, cache_lambda=, ...) are accepted too.
    k, λ and T left None come from the datastore's tuned settings
    (`knnlm.core.settings.resolve`; the paper's with `retrieval.paper_defaults`).  λ adapts
    to the text as it is read (`mixing.mode` "adaptive", knnlm.core.adapt; the default unless
    λ is given or paper_defaults) or stays fixed ("fixed"); all `texts` are read as one text.

    With `mixing.cache_lambda` the continuous cache is mixed on top (`ppl_cache`):
    p = cache_lambda * p_cache + (1 - cache_lambda) * p_kNN-LM (p_LM without a datastore),
    so cache_lambda = 0 gives the kNN-LM's perplexity exactly; "auto" is the λ the
    datastore tuned for its cache, adapting to the text (knnlm.core.settings.cache_weight).  Pointers (RetoMaton) and
    adaptive retrieval search fewer positions; `search_rate` says what share searched.

    With a `memory` decoder directory: `ppl_memory` of p = memory_lambda * p_mem +
    (1 - memory_lambda) * p_LM, and with a datastore too `ppl_knnlm_memory` (the decoder
    mixed on top of the kNN-LM); memory_lambda = 0 gives the LM's (kNN-LM's) exactly.
    A sharded datastore is searched in process, or by `retrieval.actors` Ray actors
    (on the Ray at `retrieval.ray_address`, else a local one started and stopped here).
    """
    from knnlm.memory.mix import memory_weight

    retrieval, mixing, windows, cache = fold("evaluate", flat, retrieval=retrieval, mixing=mixing,
                                             windows=windows, cache=cache)
    k, temperature, lam = retrieval.k, retrieval.temperature, mixing.lam
    window, stride = windows.window, windows.stride
    cache_lambda, memory_lambda = mixing.cache_lambda, mixing.memory_lambda
    if lm.max_positions and window > lm.max_positions:
        raise KnnlmError(f"window {window} is longer than the model's {lm.max_positions} positions")
    searcher, meta = None, None
    if datastore is not None:
        ds = open_for_model(lm, datastore)
        meta = ds.meta
        chosen = resolve(ds.meta, ds.count, k, lam, temperature, paper=retrieval.paper_defaults,
                         name=str(ds.path), lambda_mode=mixing.mode, by_distance=mixing.by_distance)
        k, lam, temperature = chosen.k, chosen.lam, chosen.temperature
        searcher = open_searcher(ds, retrieval.index, nprobe=retrieval.nprobe, rerank=retrieval.rerank,
                                 device=str(lm.device), backend="ray" if retrieval.actors else "local",
                                 actors=retrieval.actors or None, ray_address=retrieval.ray_address)
    if memory is not None:
        from knnlm.memory.decoder import MemoryDecoder

        memory = MemoryDecoder.load_for(lm, memory)
    # the continuous cache: by default the datastore's tuned cache λ, adapting, when it recorded one above 0
    cw, cache_source = (None, "off") if cache_lambda is None and retrieval.paper_defaults else \
        cache_weight(meta, cache_lambda, mixing.mode)
    cache = CacheSettings(*cache_params(meta, cache.theta, cache.size))  # given, else the datastore's, else default
    plan = plan_files(lm, texts, window, stride, windows.batch_tokens)
    t0 = time.perf_counter()
    try:
        s = score_plan(lm, plan, searcher, memory,
                       retrieval=dataclasses.replace(retrieval, k=k or DEFAULT_K,
                                                     temperature=temperature or DEFAULT_TEMPERATURE),
                       cache=cache if cw is not None else None, progress=progress)
    finally:
        if hasattr(searcher, "close"):
            searcher.close()
    total = time.perf_counter() - t0
    result = {
        "tokens": int(plan.count),
        "ppl_lm": perplexity(s.lm),
        "texts": [str(t) for t in texts],
        "model": lm.name,
        "model_dtype": str(lm.dtype).replace("torch.", ""),
        "window": window,
        "stride": stride,
        "seconds": round(total, 3),
        "tokens_per_second": round(plan.count / total, 2) if total > 0 else None,
    }
    knn = [(s.knn, Weight(lam, chosen.adapt))] if searcher is not None else []  # (log-probs, λ) of the datastore

    table = chosen.by_distance if searcher is not None else None

    def mixed(*memories) -> tuple[np.ndarray, np.ndarray]:  # the LM and memories through the one mixer
        base = None  # each position's base λ: the datastore's from its distance table, the others' own
        if table is not None:
            base = np.stack([table(s.nearest, s.lm_max)] + [np.full(len(s.lm), w.lam) for _, w in memories[1:]],
                            axis=1)
        lp, _, lams = mix_text(s.lm, np.stack([m for m, _ in memories], axis=1), [w for _, w in memories], base)
        return lp, lams

    if searcher is not None:
        knnlm_lp, lams = mixed(*knn)
        lam_end = float(lams[0])
        result.update(
            ppl_knnlm=perplexity(knnlm_lp),
            search_rate=float(s.searched.mean()),
            **(retrieval.pointers.settings() if retrieval.pointers is not None else {}),
            **(retrieval.adaptive.settings() if retrieval.adaptive is not None else {}),
            k=k,
            **{"lambda": lam},
            lambda_mode=chosen.mode,
            **({"lambda_adapted": round(lam_end, 6)} if chosen.adapt else {}),
            **({"lambda_by_distance": table.as_dict()} if table is not None else {}),
            temperature=temperature,
            settings_source=chosen.source,
            datastore=str(searcher.ds.path),
            datastore_id=searcher.ds.id,
            datastore_entries=searcher.ds.count,
            key_point=searcher.ds.key_point,
            **searcher.settings(),
            seconds_lm=round(s.seconds["lm"], 3),
            seconds_knn=round(s.seconds["knn"], 3),
        )
    cached = [(s.cache, cw)] if cw is not None else []  # the continuous cache, mixed after the datastore
    if cw is not None:
        lp, lams = mixed(*knn, *cached)
        result.update(ppl_cache=perplexity(lp), cache_lambda=cw.lam, cache_lambda_mode=cw.mode,
                      cache_lambda_source=cache_source, **({"cache_lambda_adapted": round(float(lams[-1]), 6)}
                                                           if cw.adapt else {}),
                      cache_theta=cache.theta, cache_size=cache.size, cache_key_point=CACHE_KEY_POINT)
    if memory is not None:
        mw = memory_weight(memory.meta, memory_lambda, mixing.mode, str(memory.path))
        mlam = mw.lam
        result.update(ppl_memory=perplexity(mix_text(s.lm, s.memory[:, None], [mw])[0]), memory=memory.name,
                      memory_lambda=mlam, memory_lambda_mode=mw.mode, memory_layers=memory.meta["layers"], seconds_lm=round(s.seconds["lm"], 3),
                      seconds_memory=round(s.seconds["memory"], 3))
        if searcher is not None:
            result["ppl_knnlm_memory"] = perplexity(mixed(*knn, (s.memory, mw))[0])
    # the headline: every memory mixed, in the decoding paths' order (datastore, cache, decoder)
    every = knn + cached + ([(s.memory, mw)] if memory is not None else [])
    result["mixed"] = [name for name, on in (("datastore", knn), ("cache", cw is not None and cw.lam > 0),
                                             ("memory", memory is not None)) if on]
    result["ppl"] = perplexity(mixed(*every)[0]) if every else result["ppl_lm"]
    return result
