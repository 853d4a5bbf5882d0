"""RetoMaton pointers (Alon et al., ICML 2022): follow the previous step's neighbours
instead of searching again.

After the neighbours of step t are known and the token y_t is produced (the target in
evaluation, the sampled token in generation), every neighbour whose value is y_t points
to its successor, the next entry of the same document (entry id + 1, never past the
document's last entry).  At step t+1 those successors are the candidates: they are
scored with exact distances to the new query key, and a real search runs only when
fewer than `threshold` candidates remain (or, with `every`, when `every - 1` steps in a
row went without one).  With a threshold above k every step searches, which is the
plain kNN-LM exactly.

Worked example: a document of 4 tokens holds entries 10, 11, 12 (values = its tokens
1..3).  Neighbours [11, 12, 40] with values [7, 7, 9] and produced token 7: entry 11
points to 12, entry 12 is its document's last entry and points nowhere, 40 has another
value: the candidates are [12].

`PointerState` is one sequence's state (pure: numpy only); `lookup` answers a batch of
rows, searching only those that must; `simulate` replays a whole evaluation exactly,
stepping every document in lockstep so searches still run in batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from knnlm.core.batching import doc_of
from knnlm.errors import KnnlmError


@dataclass(frozen=True)
class Pointers:
    """RetoMaton settings: search when fewer than `threshold` candidates remain, and (every
    > 0) at least once every `every` steps."""

    threshold: int = 64
    every: int = 0

    def __post_init__(self):
        if not isinstance(self.threshold, (int, np.integer)) or self.threshold < 1:
            raise KnnlmError(f"pointer threshold must be an integer >= 1, got {self.threshold!r}")
        if not isinstance(self.every, (int, np.integer)) or self.every < 0:
            raise KnnlmError(f"pointer 'every' must be an integer >= 0 (0: never forced), got {self.every!r}")

    def settings(self) -> dict:
        return {"pointer_threshold": int(self.threshold), "pointer_every": int(self.every)}


def check_pointers(ds, pointers: Pointers | None) -> None:
    """Pointers need the datastore's entry order (entry + 1 is the next token's entry)."""
    if pointers is not None and getattr(ds, "pruning", None):
        raise KnnlmError(f"pointers need every entry of the datastore in order; {ds.path} was pruned "
                         "(use its un-pruned source)")


def entry_ends(docs: np.ndarray) -> np.ndarray:
    """One past each document's last entry (D,): first entry + token count - 1."""
    return np.asarray(docs[:, 2], dtype=np.int64) + np.asarray(docs[:, 1], dtype=np.int64) - 1


def successors(ids: np.ndarray, vals: np.ndarray, token: int, docs: np.ndarray) -> np.ndarray:
    """The next entries of the neighbours `ids` (k,) whose value `vals` (k,) is `token`,
    in the neighbours' order; a document's last entry has none (pointers never cross)."""
    ids = np.asarray(ids, dtype=np.int64)
    hit = ids[(ids >= 0) & (np.asarray(vals) == token)]
    if not len(hit):
        return hit
    doc = doc_of(docs, hit)  # (h,)
    nxt = hit + 1
    return nxt[nxt < entry_ends(docs)[doc]]


class PointerState:
    """One sequence's pointers: the candidates for its next step and the steps since its
    last search.  `must_search()` before a step, `stepped(searched)` after the lookup,
    `follow(ids, vals, token, docs)` once the step's token is known."""

    __slots__ = ("settings", "candidates", "since")

    def __init__(self, settings: Pointers):
        self.settings = settings
        self.candidates = np.empty(0, dtype=np.int64)
        self.since = 0  # pointer steps since the last search

    def must_search(self) -> bool:
        s = self.settings
        return len(self.candidates) < s.threshold or (s.every > 0 and self.since + 1 >= s.every)

    def stepped(self, searched: bool) -> None:
        self.since = 0 if searched else self.since + 1

    def follow(self, ids: np.ndarray, vals: np.ndarray, token: int, docs: np.ndarray) -> None:
        self.candidates = successors(ids, vals, token, docs)

    def clear(self) -> None:
        """Nothing to follow (a step that did not retrieve): the next step searches."""
        self.candidates = np.empty(0, dtype=np.int64)


def rank_candidates(dists: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row's candidates (m, c) by distance and keep k: (m, k), -1 / inf padded."""
    m, c = ids.shape
    order = np.argsort(dists, axis=1, kind="stable")[:, :k]  # (m, min(c, k))
    out_d = np.full((m, k), np.inf, dtype=np.float32)
    out_i = np.full((m, k), -1, dtype=np.int64)
    out_d[:, : order.shape[1]] = np.take_along_axis(dists, order, 1)
    out_i[:, : order.shape[1]] = np.take_along_axis(ids, order, 1)
    out_i[~np.isfinite(out_d)] = -1
    return out_d, out_i


def pad_candidates(states: Sequence[PointerState]) -> np.ndarray:
    """The candidates of several states as one (m, c) array, -1 padded."""
    c = max((len(s.candidates) for s in states), default=0)
    out = np.full((len(states), max(c, 1)), -1, dtype=np.int64)
    for row, s in enumerate(states):
        out[row, : len(s.candidates)] = s.candidates
    return out


def lookup(search: Callable, exact: Callable, queries: np.ndarray, states: Sequence[PointerState | None],
           k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Neighbours of a batch of rows: rows without a state, or whose state must search, are
    searched together (`search(rows, queries, k)`, rows: their indices in the batch); the others get their candidates ranked by
    exact distance (`exact(queries, ids) -> dists`).  dists (m, k), ids (m, k), searched
    (m,) bool.  Updates each state's step count."""
    m = len(states)
    searched = np.array([s is None or s.must_search() for s in states], dtype=bool)
    dists = np.full((m, k), np.inf, dtype=np.float32)
    ids = np.full((m, k), -1, dtype=np.int64)
    if searched.any():
        rows = np.nonzero(searched)[0]
        dists[rows], ids[rows] = search(rows, queries[rows], k)
    follow = np.nonzero(~searched)[0]
    if len(follow):
        cand = pad_candidates([states[i] for i in follow])  # (f, c)
        dists[follow], ids[follow] = rank_candidates(exact(queries[follow], cand), cand, k)
    for s, did in zip(states, searched):
        if s is not None:
            s.stepped(bool(did))
    return dists, ids, searched


@dataclass
class Replay:
    """An evaluation replayed with pointers: log p_kNN(target) per position (n, len(T)),
    which positions searched, and how many candidates the pointer steps had."""

    knn: np.ndarray
    searched: np.ndarray
    candidates: np.ndarray  # (n,) candidates at each position (0 where it searched for want of them)
    nearest: np.ndarray | None = None  # (n,) the nearest neighbour's distance (NaN where none was looked up)

    @property
    def search_rate(self) -> float:
        return float(self.searched.mean()) if self.searched.size else float("nan")


def simulate(queries: np.ndarray, targets: np.ndarray, doc_first: np.ndarray, vals: np.ndarray,
             ds, search: Callable, exact: Callable, k: int, pointers: Pointers | None,
             temperatures: Sequence[float] = (1.0,), skip: np.ndarray | None = None,
             progress: bool = False) -> Replay:
    """Score every position of an evaluation as a left-to-right pass with pointers would.

    queries (n, d) query keys, targets (n,), doc_first (D,) first position of each
    document (ascending, from 0); vals the datastore's values (an array in memory is
    faster than its memmap) and ds the Datastore (its document table, merged counts).
    `search(positions, queries, k)` and `exact(queries, ids)` answer the lookups (so
    precomputed search results can stand in for the index).  The query keys do not depend
    on retrieval, so stepping all documents in lockstep (position j of every document
    together) gives exactly the left-to-right result with searches still batched.
    `skip` (n,) bool: positions that do not retrieve (adaptive retrieval): their p_kNN is
    NaN and the next position has no pointers.  pointers None: every position searches.
    """
    from tqdm.auto import tqdm

    from knnlm.core.scoring import knn_target_logprobs

    check_pointers(ds, pointers)
    docs = np.asarray(ds.docs)
    n = len(targets)
    starts = np.asarray(doc_first, dtype=np.int64)
    lengths = np.diff(np.append(starts, n))  # (D,)
    states = [PointerState(pointers) if pointers is not None else None for _ in starts]
    knn = np.full((n, len(temperatures)), np.nan)
    searched = np.zeros(n, dtype=bool)
    ncand = np.zeros(n, dtype=np.int32)
    nearest = np.full(n, np.nan)
    order = np.argsort(-lengths, kind="stable")  # longest first: the active documents are a prefix
    bar = tqdm(total=n, unit="tok", desc="pointers", disable=not progress)
    for j in range(int(lengths.max(initial=0))):
        active = order[: int((lengths > j).sum())]
        pos = starts[active] + j  # (b,)
        go = np.ones(len(pos), dtype=bool) if skip is None else ~skip[pos]
        for a in active[~go]:  # no retrieval here: nothing to follow at the next position
            if states[a] is not None:
                states[a].clear()
        act, p = active[go], pos[go]
        if len(p):
            st = [states[a] for a in act]
            ncand[p] = [len(s.candidates) if s is not None else 0 for s in st]
            d, i, did = lookup(lambda rows, q, kk: search(p[rows], q, kk), exact, queries[p], st, k)
            searched[p] = did
            v = vals[np.maximum(i, 0)]  # (b, k)
            nearest[p] = d[:, 0]
            for col, t in enumerate(temperatures):
                knn[p, col] = knn_target_logprobs(d, v, targets[p], t, counts=ds.counts_of(i))
            for row, s in enumerate(st):
                if s is not None:
                    s.follow(i[row], v[row], int(targets[p[row]]), docs)
        bar.update(len(active))
    bar.close()
    return Replay(knn, searched, ncand, nearest)
