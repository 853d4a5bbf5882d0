"""Several generations stepped together: one forward step of the whole batch and one
datastore search per (datastore, k) per token, instead of one of each per generation.

    batch = BatchGenerator(knn, max_batch=8)
    events = batch.add("a", knn.prepare("The history of", 20, datastore="wiki"))
    while len(batch):
        for tag, evs in batch.step().items():
            ...  # StreamEvents, as KNNLM.stream yields them; the last has a finish_reason

Each generation is prefilled alone (its prompt in one forward pass, as `KNNLM.run`), then
its KV cache joins the batch's, left-padded to a common length; an attention mask hides
the padding and each row keeps its own positions, so a row's scores match running it
alone up to float rounding.  Generations join and leave between steps (continuous
batching), each with its own datastore, λ, k, temperature, sampling and seed.  Models
whose cache is not a plain per-layer key/value cache (sliding windows, recurrent state)
run one generation at a time.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Hashable

import numpy as np
import torch
import torch.nn.functional as F

from knnlm.core.model import cached_forward
from knnlm.errors import KnnlmError
from knnlm.memory.decoder import step_logits
from knnlm.run.continuous import CACHE_KEY_POINT
from knnlm.run.decode import Decoder, GenerationRequest, Host, SequenceState, StreamEvent, next_distributions


@dataclass
class _Row:
    tag: Hashable
    seq: SequenceState
    token: int  # the next token to feed


def _stackable(cache: Any) -> bool:
    """Whether the cache is a list of plain (keys, values) layers that can be padded and stacked."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def _pad_seq(x: torch.Tensor, length: int) -> torch.Tensor:
    """Left-pad (B, H, L, D) cache tensors to `length` along L."""
    return F.pad(x, (0, 0, length - x.shape[-2], 0))


def _pad_mask(m: torch.Tensor, length: int) -> torch.Tensor:
    return F.pad(m, (length - m.shape[-1], 0))


def _pad_cache(cache, length: int) -> None:
    for layer in cache.layers:
        layer.keys, layer.values = _pad_seq(layer.keys, length), _pad_seq(layer.values, length)


def _stack_caches(mine, theirs, length: int):
    """Both caches left-padded to `length`, theirs' rows after mine's (mine None: theirs)."""
    _pad_cache(theirs, length)
    if mine is None:
        return theirs
    _pad_cache(mine, length)
    for a, b in zip(mine.layers, theirs.layers):
        a.keys, a.values = torch.cat([a.keys, b.keys]), torch.cat([a.values, b.values])
    return mine


def _select_cache(cache, rows: torch.Tensor, start: int) -> None:
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[rows, :, start:], layer.values[rows, :, start:]


class BatchGenerator:
    """Up to `max_batch` generations of one KNNLM, stepped together (see the module doc).
    Not thread-safe: one caller at a time, like KNNLM."""

    def __init__(self, knnlm: Host, max_batch: int = 8):
        if max_batch < 1:
            raise KnnlmError(f"max_batch must be >= 1, got {max_batch}")
        self.knnlm, self.lm, self.max_batch = knnlm, knnlm.lm, max_batch
        self.rows: list[_Row] = []
        self.cache = None  # the rows' KV cache, left-padded to a common length
        self.mask: torch.Tensor | None = None  # (B, L) long: 1 where the cache holds a real token
        self.stackable: bool | None = None  # known after the first prefill
        self.mem_caches: dict[str, Any] = {}  # per memory decoder: the KV cache of the rows that use it

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def tags(self) -> list[Hashable]:
        return [row.tag for row in self.rows]

    def has_room(self) -> bool:
        return len(self.rows) < (self.max_batch if self.stackable is not False else 1)

    def add(self, tag: Hashable, req: GenerationRequest) -> list[StreamEvent]:
        """Prefill a generation and pick its first token; its events so far.  Unless that
        already finished it, the generation joins the batch under `tag`."""
        if not self.has_room():
            raise KnnlmError(f"the batch is full ({len(self.rows)} generations)")
        if tag in self.tags:
            raise KnnlmError(f"tag {tag!r} is already in the batch")
        seq = SequenceState(self.knnlm, req)
        dec = Decoder(self.lm, req.r, req.m, seq.mixing)
        dec.feed(req.ids)
        events, token = seq.advance(*dec.distribution(seq.pointers), dec.dists, dec.ids)
        if token is not None:
            self._join(dec.cache, len(req.ids), req.m and req.m.name, dec.mem_cache)
            self.rows.append(_Row(tag, seq, token))
        return events

    def step(self) -> dict[Hashable, list[StreamEvent]]:
        """One token for every generation in the batch: their events by tag.  Generations
        whose last event has a finish_reason have left the batch."""
        if not self.rows:
            return {}
        rows, dev = self.rows, self.lm.device
        b = len(rows)
        tokens = torch.tensor([[row.token] for row in rows], device=dev)  # (B, 1)
        positions = self.mask.sum(1, keepdim=True)  # (B, 1): each row's own next position
        mask = torch.cat([self.mask, torch.ones(b, 1, dtype=self.mask.dtype, device=dev)], 1)
        kps = sorted({row.seq.req.r.ds.key_point for row in rows if row.seq.req.r is not None}
                     | ({CACHE_KEY_POINT} if any(row.seq.mixing.cache is not None for row in rows) else set()))
        with torch.inference_mode(), self.lm._capture(kps) as captured:
            out, cache = cached_forward(self.lm.model, self.cache, input_ids=tokens, attention_mask=mask,
                                        position_ids=positions)
            keys = {kp: captured[kp].reshape(b, -1, captured[kp].shape[-1])[:, -1].float().cpu().numpy()
                    for kp in kps}  # (B, d)
        self.cache, self.mask = cache, mask
        logits = out.logits[:, -1]  # (B, V)
        for i, row in enumerate(rows):  # each row's continuous cache takes its fed token's final hidden state
            if row.seq.mixing.cache is not None:
                row.seq.mixing.cache.feed(keys[CACHE_KEY_POINT][i : i + 1], [row.token])

        groups: dict[tuple, list[int]] = defaultdict(list)  # one search per (datastore, k)
        for i, row in enumerate(rows):
            r = row.seq.req.r
            if r is not None and not r.skips(logits[i]):  # adaptive retrieval may skip a confident row
                groups[(id(r.searcher), r.k)].append(i)
        found: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for idx in groups.values():
            r = rows[idx[0]].seq.req.r  # rows that still have enough pointers are not searched
            dists, ids = r.retrieve(keys[r.ds.key_point][idx], [rows[i].seq.pointers for i in idx])  # (n, k)
            found.update({i: (dists[j : j + 1], ids[j : j + 1]) for j, i in enumerate(idx)})

        mem_logits: dict[int, torch.Tensor] = {}  # one step of each memory decoder over the rows that use it
        for name in self.mem_caches:
            idx = [i for i, row in enumerate(rows) if row.seq.req.m is not None and row.seq.req.m.name == name]
            sel = torch.tensor(idx, device=dev)
            out_m, self.mem_caches[name] = step_logits(rows[idx[0]].seq.req.m.decoder, tokens[sel],
                                                       self.mem_caches[name], mask[sel], positions[sel])
            mem_logits.update(zip(idx, out_m))

        results, keep = {}, []
        for i, row in enumerate(rows):
            dists, ids = found.get(i, (None, None))
            dist = next_distributions(logits[i], row.seq.req.r, dists, ids, row.seq.req.m, mem_logits.get(i),
                                      row.seq.mixing)
            events, token = row.seq.advance(*dist, dists, ids)
            results[row.tag] = events
            if token is not None:
                row.token = token
                keep.append(i)
        self._keep(keep)
        return results

    def drop(self, tag: Hashable) -> None:
        """Take a generation out of the batch (a cancelled request)."""
        self._keep([i for i, row in enumerate(self.rows) if row.tag != tag])

    def clear(self) -> None:
        self.rows, self.cache, self.mask, self.mem_caches = [], None, None, {}

    # ---- the padded cache --------------------------------------------------------------
    def _join(self, cache, n: int, mem_name: str | None = None, mem_cache=None) -> None:
        """Add a prefilled sequence's cache (batch 1, length n) to the batch's, and its
        memory decoder's cache (same tokens, same padding) to that decoder's."""
        if self.stackable is None:
            self.stackable = _stackable(cache) and (mem_cache is None or _stackable(mem_cache))
        mask = torch.ones(1, n, dtype=torch.long, device=self.lm.device)
        if not self.rows:  # the batch's cache is this one
            self.cache, self.mask = cache, mask
            if mem_name is not None:
                self.mem_caches = {mem_name: mem_cache}
            return
        length = max(self.mask.shape[1], n)
        self.cache = _stack_caches(self.cache, cache, length)
        self.mask = torch.cat([_pad_mask(self.mask, length), _pad_mask(mask, length)])
        for name in self.mem_caches:
            _pad_cache(self.mem_caches[name], length)
        if mem_name is not None:
            self.mem_caches[mem_name] = _stack_caches(self.mem_caches.get(mem_name), mem_cache, length)

    def _keep(self, idx: list[int]) -> None:
        """Keep these rows; trim the padding columns no remaining row needs."""
        if len(idx) == len(self.rows):
            return
        if not idx:
            self.clear()
            return
        sel = torch.tensor(idx, device=self.lm.device)
        mask = self.mask[sel]
        start = int(torch.nonzero(mask.sum(0))[0])  # the first column a remaining row uses
        _select_cache(self.cache, sel, start)
        for name in list(self.mem_caches):  # the decoder's rows, in batch order: which of them stay
            users = [i for i, row in enumerate(self.rows) if row.seq.req.m is not None and row.seq.req.m.name == name]
            stay = [j for j, i in enumerate(users) if i in idx]
            if stay:
                _select_cache(self.mem_caches[name], torch.tensor(stay, device=self.lm.device), start)
            else:
                del self.mem_caches[name]
        self.rows = [self.rows[i] for i in idx]
        self.mask = mask[:, start:]
