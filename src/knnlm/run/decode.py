"""Decoding one step at a time: the per-call retrieval settings, next-token distributions
(LM, p_kNN and their mixture), sampling, and a generation's progress (text, stop strings).
`KNNLM` (knnlm.run.generate) steps one sequence; `BatchGenerator` (knnlm.run.batch) several.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol
from typing import Sequence as Seq

import numpy as np
import torch

from knnlm.core.datastore import Datastore
from knnlm.core.index import Searcher
from knnlm.core.mix import Mixture, Weight, mix_vocab
from knnlm.core.model import cached_forward
from knnlm.core.neighbor import DistanceLambda
from knnlm.core.scoring import knn_probabilities, knn_target_logprobs
from knnlm.memory.decoder import MemoryUse, align_vocab, step_logits
from knnlm.retrieval.adaptive import Adaptive, confidence
from knnlm.retrieval.pointers import Pointers, PointerState, lookup
from knnlm.run.continuous import CACHE_KEY_POINT, CacheState, CacheUse
from knnlm.run.options import MAX_STOPS, check_sampling, parse_stops  # noqa: F401  (here before options)



@dataclass
class Neighbor:
    """One retrieved datastore entry and the share of the kNN distribution it carried."""

    datastore: str
    entry: int  # row in the datastore
    document: int
    title: str
    source: str  # corpus file the document came from
    offset: int  # token offset of `token` in its document
    distance: float  # squared L2 to the query key
    weight: float  # softmax(-distance / T) over the k neighbours
    token: str  # the value: the token that followed this memory
    token_id: int
    context: str  # the document's text just before `token`
    after: str  # and just after it


@dataclass
class TokenScore:
    """One token with its log-probabilities under the LM, p_kNN and the mixture."""

    id: int
    text: str
    logprob: float  # log p_kNN-LM, the distribution the token was scored (or sampled) under
    logprob_lm: float
    logprob_knn: float | None  # None without a datastore; -inf when no neighbour predicts it
    neighbors: list[Neighbor] = field(default_factory=list)
    top: dict[str, float] = field(default_factory=dict)  # the most likely tokens' log p_kNN-LM, when asked
    logprob_memory: float | None = None  # log p_mem of a memory decoder, when one is mixed in (scoring)
    logprob_lm_max: float | None = None  # the LM's log max p at this position (its confidence; scoring)
    logprob_cache: float | None = None  # log p_cache of the continuous cache, when it is mixed in (scoring; NaN: empty)


@dataclass
class StreamEvent:
    """One generated token (`token`) and the text it adds (`text`, may be "" while a
    partial character or a possible stop string is held back); the last event of a
    stream has token None and a finish_reason: "stop" (EOS or a stop string) or "length"."""

    text: str
    token: TokenScore | None = None
    finish_reason: str | None = None


@dataclass
class Retrieval:
    """Resolved per-call settings for one datastore."""

    name: str
    searcher: Searcher
    lam: float
    k: int
    temperature: float
    pointers: Pointers | None = None  # RetoMaton: follow the last step's neighbours, search when too few
    adaptive: Adaptive | None = None  # skip the search where the LM is confident
    adapt: bool = False  # λ adapts from `lam` as the text (prompt and generated tokens) is read (knnlm.core.mix)
    by_distance: DistanceLambda | None = None  # each position's base λ from its nearest distance

    @property
    def ds(self) -> Datastore:
        return self.searcher.ds

    @property
    def weight(self) -> Weight:
        return Weight(self.lam, self.adapt)

    def settings(self) -> dict:
        out = {"datastore": self.name, "lambda": self.lam, "lambda_mode": "adaptive" if self.adapt else "fixed",
               "k": self.k, "knn_temperature": self.temperature}
        if self.by_distance is not None:
            out["lambda_by_distance"] = self.by_distance.as_dict()
        if self.pointers is not None:
            out.update(self.pointers.settings())
        if self.adaptive is not None and self.adaptive.threshold is not None:
            out.update(self.adaptive.settings())
        return out

    def skips(self, logits: torch.Tensor) -> bool:
        """Whether adaptive retrieval skips the search at a position with these LM logits (V,)."""
        if self.adaptive is None or self.adaptive.threshold is None:
            return False
        max_lp, ent = confidence(logits)
        return bool(self.adaptive.skip(max_lp.cpu().numpy()[None], ent.cpu().numpy()[None])[0])

    def retrieve(self, queries: np.ndarray, states: Seq[PointerState | None]) -> tuple[np.ndarray, np.ndarray]:
        """Neighbours (m, k) of several positions: searched together, except rows whose
        pointer state still has enough candidates (ranked by exact distance instead)."""
        d, i, _ = lookup(lambda rows, q, k: self.searcher.search(q, k), self.searcher.exact, queries, states, self.k)
        return d, i


class Host(Protocol):
    """What decoding needs of the model it runs for (a `knnlm.run.generate.KNNLM`): the LM,
    a neighbour's source, the most likely tokens of a distribution."""

    lm: object

    def neighbors_of(self, r: Retrieval, dists: np.ndarray, ids: np.ndarray, n: int) -> list[Neighbor]: ...

    def top_tokens(self, logprobs: torch.Tensor, n: int) -> dict[str, float]: ...


def settings_of(r: Retrieval | None) -> dict:
    return r.settings() if r is not None else {"datastore": None}


class MixState:
    """One sequence's mixing (knnlm.core.mix): the datastore's p_kNN, then the continuous
    cache's p_cache, then a memory decoder's p_mem, each on top of the mixture before it
    (evaluate's order), with the λ policy of each (fixed, or adapting to the tokens read so
    far).  `mix` gives the next token's distribution; `observe` takes the token that came as
    evidence; `read` a whole text's tokens at once.  `cache`: the sequence's cache entries
    (knnlm.run.continuous), fed by whoever runs the model."""

    def __init__(self, r: Retrieval | None, m: MemoryUse | None = None, c: CacheUse | None = None):
        self.slots = (r is not None, c is not None, m is not None)  # which memories this sequence mixes
        self.mixture = Mixture([x.weight for x in (r, c, m) if x is not None])
        self.table = r.by_distance if r is not None else None
        self.lams = [x.lam for x in (r, c, m) if x is not None]
        self.cache = CacheState(c) if c is not None else None
        self.pending: tuple | None = None  # the last `mix`'s (lm, memories, base) log-probs, until `observe`

    @property
    def adapts(self) -> bool:
        return self.mixture.adapts

    def base(self, nearest, confidence=None) -> np.ndarray | None:
        """Each memory's base λ (n, J) at positions whose nearest neighbours are at `nearest`
        (n,) and where the LM's log max p is `confidence` (n,): the datastore's from its
        distance table, the others' their own; None without a table."""
        if self.table is None:
            return None
        d = np.atleast_1d(np.asarray(nearest, dtype=np.float64))
        c = None if confidence is None else np.atleast_1d(np.asarray(confidence, dtype=np.float64))
        cols = [self.table(d, c)] + [np.full(len(d), lam) for lam in self.lams[1:]]
        return np.stack(cols, axis=1)

    def mix(self, lm_lp: torch.Tensor, knn_lp: torch.Tensor | None, hit: torch.Tensor | None,
            mem_lp: torch.Tensor | None, nearest: float | None = None) -> torch.Tensor:
        """log p(next token) (V,) from the LM's, p_kNN's (None: no retrieval here; -inf
        outside `hit`) and p_mem's log-probs (V,), with the cache's from its entries so far;
        `nearest`: the nearest neighbour's distance."""
        cache_lp, cache_hit = self.cache.logprobs(lm_lp) if self.cache is not None else (None, None)
        mems = [x for x, on in zip((knn_lp, cache_lp, mem_lp), self.slots) if on]
        hits = [x for x, on in zip((hit, cache_hit, None), self.slots) if on]
        base = None if nearest is None else self.base([nearest], [float(lm_lp.max())])
        base = None if base is None else base[0]
        omega = self.mixture.omega([x is not None for x in mems], base)
        self.pending = (lm_lp, mems, base) if self.adapts else None
        return mix_vocab(lm_lp, mems, omega, hits)

    def observe(self, token: int) -> None:
        if self.pending is not None:
            lm_lp, mems, base = self.pending
            self.mixture.observe(float(lm_lp[token]), [math.nan if x is None else float(x[token]) for x in mems], base)
        self.pending = None

    def read(self, lm_logprobs: np.ndarray, knn_logprobs: np.ndarray | None, mem_logprobs: np.ndarray | None,
             nearest: np.ndarray | None = None, confidence: np.ndarray | None = None,
             cache_logprobs: np.ndarray | None = None):
        """A text's targets (n,) each: their flat weights (n, J), taken in as evidence;
        nearest (n,): each position's nearest neighbour's distance (NaN: none); confidence
        (n,): the LM's log max p at each position; cache_logprobs (n,): log p_cache of each
        target (NaN: an empty cache)."""
        cols = [x for x, on in zip((knn_logprobs, cache_logprobs, mem_logprobs), self.slots) if on]
        mems = np.stack(cols, axis=1) if cols else np.zeros((len(lm_logprobs), 0))
        base = None if nearest is None or self.table is None else self.base(nearest, confidence)
        return self.mixture.step(lm_logprobs, mems, base), mems


@dataclass
class GenerationRequest:
    """A checked generation request (from `KNNLM.prepare`), ready to `run`."""

    ids: list[int]  # the prompt
    r: Retrieval | None
    max_new_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    stops: list[str]
    seed: int | None
    ignore_eos: bool
    neighbors: int
    top_logprobs: int
    report_eos: bool = False  # the EOS that ends the generation is reported as a last token (text "")
    m: MemoryUse | None = None  # a memory decoder mixed on top
    c: CacheUse | None = None  # the continuous cache, mixed after the datastore

    @property
    def settings(self) -> dict:
        return {**settings_of(self.r), **(self.c.settings() if self.c else {}), **(self.m.settings() if self.m else {})}


def filter_logprobs(logprobs: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Log-probs (V,) with the tokens outside the top k, and outside the smallest set whose
    probability reaches top_p, set to -inf.  The most likely token always stays.

    p = (.5, .3, .15, .05): top_k=3 drops .05; top_p=.7 keeps .5 and .3 (.5 < .7 <= .8).
    """
    out = logprobs.clone()
    if top_k is not None and top_k < out.numel():
        kth = torch.topk(out, top_k).values[-1]
        out[out < kth] = -math.inf
    if top_p is not None and top_p < 1.0:
        lp, order = torch.sort(out, descending=True)  # (V,)
        before = torch.cumsum(lp.softmax(0), 0) - lp.softmax(0)  # mass of the more likely tokens
        drop = before >= top_p  # (a top_p below float32's smallest number compares as 0: drops them all...)
        drop[0] = False  # (... but the most likely stays)
        out[order[drop]] = -math.inf
    return out


def sample(logprobs: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> int:
    """A token id from log-probs (V,): the argmax at temperature 0, else a draw from
    softmax(logprobs / temperature) after top-k / top-p filtering."""
    if temperature == 0.0:
        return int(torch.argmax(logprobs))
    lp = filter_logprobs(logprobs.float() / temperature, top_k, top_p)  # (V,)
    probs = torch.softmax(lp, 0)
    if not bool(torch.isfinite(probs).all()):  # a temperature so small that log p / T overflows: its limit
        return int(torch.argmax(logprobs))
    return int(torch.multinomial(probs, 1, generator=generator))


def _find_stop(text: str, stops: list[str]) -> int | None:
    """Where the first stop string starts in text, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _shown_up_to(text: str, stops: list[str]) -> int:
    """How much of text is safe to show: hold back a trailing partial character (byte-level
    tokenizers decode an incomplete UTF-8 sequence as U+FFFD) and any tail that could be
    the start of a stop string."""
    end = len(text)
    while end > 0 and len(text) - end < 4 and text[end - 1] == "\ufffd":
        end -= 1
    hold = max((n for s in stops for n in range(1, len(s)) if text[:end].endswith(s[:n])), default=0)
    return end - hold


def mix_distributions(lm_lp: torch.Tensor, knn_lp: torch.Tensor | None, lam: float) -> torch.Tensor:
    """log(λ p_kNN + (1-λ) p_LM) over the vocabulary (..., V); λ = 0 returns lm_lp itself."""
    return lm_lp if knn_lp is None else mix_vocab(lm_lp, [knn_lp], [lam])


class Decoder:
    """One sequence stepped through the model with its KV cache: `feed` new tokens, then
    read the next-token distributions at the last position."""

    def __init__(self, lm, r: Retrieval | None, m: MemoryUse | None = None, mixing: MixState | None = None):
        self.lm, self.r, self.m = lm, r, m
        self.mixing = mixing if mixing is not None else MixState(r, m)  # an adaptive λ reads the prompt too
        self.mem_cache = self.mem_logits = None  # the memory decoder's own KV cache and last logits
        self.cache = None
        self.logits: torch.Tensor | None = None  # (V,) at the last position
        self.key: np.ndarray | None = None  # (1, d) float32 at the last position
        self.dists = self.ids = None  # (1, k) neighbours of the last key

    @torch.inference_mode()
    def feed(self, ids: list[int]) -> None:
        x = torch.tensor([ids], device=self.lm.device)  # (1, t)
        kps = [self.r.ds.key_point] if self.r else []
        cache = self.mixing.cache  # the continuous cache's keys: the final hidden states of the same pass
        if cache is not None and CACHE_KEY_POINT not in kps:
            kps.append(CACHE_KEY_POINT)
        evidence = self.mixing.adapts and len(ids) > 1  # the prompt's own tokens, read as scoring reads a text
        with self.lm._capture(kps) as captured:
            out, self.cache = cached_forward(self.lm.model, self.cache, input_ids=x)
        self.logits = out.logits[0, -1]  # (V,)
        keys = mem_all = cache_lp = None
        if cache is not None:
            h = captured[CACHE_KEY_POINT].reshape(x.shape[1], -1).float().cpu().numpy()  # (t, d)
            cache_lp = cache.targets(h, ids) if evidence else None
            cache.feed(h, ids)
        if self.r is not None:
            keys = captured[self.r.ds.key_point].reshape(x.shape[1], -1).float().cpu().numpy()  # (t, d)
            self.key = keys[-1:]  # (1, d)
        if self.m is not None:
            logits, self.mem_cache = step_logits(self.m.decoder, x, self.mem_cache, every=evidence)
            mem_all = logits[0] if evidence else None  # (t, V_mem)
            self.mem_logits = logits[0, -1] if evidence else logits[0]  # (V_mem,)
        if evidence:
            self._read(ids, out.logits[0], keys, mem_all, cache_lp)

    def _read(self, ids: list[int], logits: torch.Tensor, keys: np.ndarray | None,
              mem_logits: torch.Tensor | None, cache_lp: np.ndarray | None = None) -> None:
        """Take the fed tokens ids[1:] in as the mixing's evidence (a plain search for each;
        cache_lp: their log p_cache)."""
        targets = torch.tensor(ids[1:], device=logits.device)[:, None]  # (t-1, 1)
        lm_all = torch.log_softmax(logits[:-1].float(), -1)  # (t-1, V)
        lm = lm_all.gather(1, targets)[:, 0].cpu().numpy()  # (t-1,)
        knn = mem = nearest = None
        if self.r is not None:
            d, i = self.r.searcher.search(keys[:-1], self.r.k)  # (t-1, k)
            knn = target_knn_logprobs(self.r, d, i, np.asarray(ids[1:]))
            nearest = d[:, 0]
        if self.m is not None:
            mem_lp = torch.log_softmax(mem_logits[:-1].float(), -1)
            mem = mem_lp.gather(1, targets.to(mem_lp.device))[:, 0].cpu().numpy()
        self.mixing.read(lm, knn, mem, nearest, lm_all.max(-1).values.cpu().numpy(), cache_lp)

    def distribution(self, state: PointerState | None = None) -> tuple[torch.Tensor, torch.Tensor,
                                                                           torch.Tensor | None]:
        """(mix, lm, knn) log-probs (V,) after the tokens fed so far; `state`: the sequence's
        pointers (RetoMaton), if any.  A step adaptive retrieval skips has knn None."""
        self.dists = self.ids = None
        if self.r is not None and not self.r.skips(self.logits):
            self.dists, self.ids = self.r.retrieve(self.key, [state])  # (1, k)
        return next_distributions(self.logits, self.r, self.dists, self.ids, self.m, self.mem_logits, self.mixing)


def target_knn_logprobs(r: Retrieval, dists: np.ndarray, ids: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log p_kNN(target) (n,) from each position's neighbours (n, k); NaN where a position
    has no neighbour at all (skipped, or an IVF probe that found none): p_LM alone there."""
    out = knn_target_logprobs(dists, r.ds.vals[np.maximum(ids, 0)], targets, r.temperature,
                              counts=r.ds.counts_of(ids))
    out[(ids < 0).all(axis=1) | np.isnan(dists[:, 0])] = np.nan
    return out


@torch.inference_mode()
def next_distributions(logits: torch.Tensor, r: Retrieval | None, dists: np.ndarray | None,
                       ids: np.ndarray | None, m: MemoryUse | None = None,
                       mem_logits: torch.Tensor | None = None,
                       mixing: MixState | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(mix, lm, knn) log-probs (V,) from the LM's logits (V,) at one position and that
    position's neighbours (dists, ids: (1, k)) in r's datastore (r None: the base LM;
    dists None: no retrieval at this position, p_LM alone); with a memory decoder m and
    its logits at the position, p_mem is mixed on top.  `mixing`: the sequence's mixing
    state (its λ so far); None: the settings' λ."""
    lm_lp = torch.log_softmax(logits.float(), -1).cpu()  # (V,)
    knn_lp = hit = mem_lp = None
    if r is not None and dists is not None:
        vals = r.ds.vals[np.maximum(ids, 0)]  # (1, k); a missing neighbour weighs 0
        knn_lp, hit = sparse_knn_distribution(dists, vals, lm_lp.shape[-1], r.temperature, r.ds.counts_of(ids))
    if m is not None:
        mem_lp = align_vocab(torch.log_softmax(mem_logits.float(), -1).cpu(), lm_lp.shape[-1])  # (V,)
    mixing = mixing if mixing is not None else MixState(r, m)
    speaks = knn_lp is not None and len(hit) > 0  # no neighbour at all (an IVF probe found none): p_LM
    mix = mixing.mix(lm_lp, knn_lp if speaks else None, hit, mem_lp, float(dists[0, 0]) if speaks else None)
    return mix, lm_lp, knn_lp


def sparse_knn_distribution(dists: np.ndarray, vals: np.ndarray, vocab_size: int, temperature: float,
                            counts: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`knn_distribution` of one position (dists, vals: (1, k)) as log-probs (V,), and the
    token ids (u,) where p_kNN > 0: at most k of the V tokens, so the logarithm (and
    `mix_at`) need not run over the whole vocabulary.  The same numbers as knn_distribution
    (up to the last bit: torch may round a short vector and a long one apart)."""
    p = knn_probabilities(dists, vals, vocab_size, temperature, counts)  # (1, V)
    hit = torch.nonzero(p[0]).squeeze(1)  # (u,)
    out = torch.full((vocab_size,), -math.inf, dtype=torch.float32)
    out[hit] = torch.log(p[0, hit])
    return out, hit


def mix_at(lm_lp: torch.Tensor, knn_lp: torch.Tensor, hit: torch.Tensor, lam: float) -> torch.Tensor:
    """`mix_distributions(lm_lp, knn_lp, lam)` (V,) when knn_lp is -inf outside `hit`: the
    logaddexp runs only at the hit tokens (knnlm.core.mix.mix_vocab)."""
    return mix_vocab(lm_lp, [knn_lp], [lam], [hit])


class SequenceState:
    """One generation's progress: samples each next token from the distributions it is
    given, tracks the text and stop strings, and says what to feed next (None: done).
    `KNNLM.run` steps one of these alone; `BatchGenerator` steps several together."""

    def __init__(self, knnlm: Host, req: GenerationRequest):
        self.knnlm, self.req = knnlm, req
        self.gen = torch.Generator()
        if req.seed is None:
            self.gen.seed()
        else:
            self.gen.manual_seed(req.seed)
        self.eos = knnlm.lm.tokenizer.eos_token_id
        self.out: list[int] = []
        self.shown, self.text = 0, ""
        r = req.r
        self.pointers = PointerState(r.pointers) if r is not None and r.pointers is not None else None
        self.mixing = MixState(r, req.m, req.c)  # the λ of each memory, as this generation reads its tokens

    def advance(self, mix: torch.Tensor, lm_lp: torch.Tensor, knn_lp: torch.Tensor | None,
                dists: np.ndarray | None, ids: np.ndarray | None) -> tuple[list[StreamEvent], int | None]:
        """Pick the next token; the events to deliver, and the token to feed (None: finished,
        the last event carries the finish reason)."""
        req, knnlm = self.req, self.knnlm
        tok = sample(mix, req.temperature, req.top_k, req.top_p, self.gen)
        self.mixing.observe(tok)
        eos = tok == self.eos and not req.ignore_eos
        if eos and not req.report_eos:
            return [self._end("stop")], None
        r = req.r
        if self.pointers is not None:  # the neighbours whose value is the chosen token lead to the next step
            if ids is None:
                self.pointers.clear()
            else:
                self.pointers.follow(ids[0], r.ds.vals[np.maximum(ids[0], 0)], tok, r.ds.docs)
        nb = knnlm.neighbors_of(r, dists[0], ids[0], req.neighbors) if r and req.neighbors and ids is not None else []
        score = TokenScore(tok, "" if eos else knnlm.lm.decode([tok]), float(mix[tok]), float(lm_lp[tok]),
                           None if knn_lp is None else float(knn_lp[tok]), nb, knnlm.top_tokens(mix, req.top_logprobs))
        if eos:
            return [StreamEvent("", score), self._end("stop")], None
        self.out.append(tok)
        text = knnlm.lm.decode(self.out)
        cut = _find_stop(text, req.stops)
        if cut is not None:
            self.text = text[:cut]
            event = StreamEvent(self.text[self.shown:], score)
            self.shown = len(self.text)
            return [event, self._end("stop")], None
        self.text = text
        end = _shown_up_to(text, req.stops)
        event = StreamEvent(text[self.shown:end], score)
        self.shown = max(self.shown, end)
        if len(self.out) == req.max_new_tokens:
            return [event, self._end("length")], None
        return [event], tok

    def _end(self, finish: str) -> StreamEvent:
        return StreamEvent(self.text[self.shown:], None, finish)
