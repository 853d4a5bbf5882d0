"""Generation and scoring with a kNN-LM, from Python: the API that `knnlm generate` and
`knnlm serve` are thin edges over.

    from knnlm.run.generate import KNNLM

    knn = KNNLM.load("smollm2-135m", {"wiki": "ds-wiki", "law": "ds-law"})
    knn.generate("The history of", 32, Sampling(temperature=0.7), datastore="wiki", mixing=MixSettings(lam=0.25)).text
    knn.score("Some text.", datastore="law", retrieval=RetrievalSettings(k=64)).ppl
    with knn.disabled():                      # the base LM, exactly
        knn.generate("The history of").text

Generation keeps the model's KV cache: each new token costs one forward step on one
token and one datastore search, never a re-run of the prefix.  Every call names its
datastore (`datastore=None`: the base LM) and may override λ, k and the kNN temperature
(`retrieval=`, `mixing=`: knnlm.run.options; their flat names lam=, k=, knn_temperature=,
pointers=, adaptive=, memory_lambda= and the Sampling's temperature=, stop=, ... work too).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch

from knnlm.core.attribution import Attribution, attribute_neighbors
from knnlm.core.mix import mix_targets, mix_vocab
from knnlm.core.datastore import Datastore
from knnlm.core.index import Searcher
from knnlm.core.scoring import check_settings, knn_distribution, perplexity
from knnlm.core.settings import resolve
from knnlm.errors import KnnlmError
from knnlm.memory.decoder import MemoryDecoder, MemoryUse, align_vocab
from knnlm.memory.mix import check_memory_lambda, memory_weight
from knnlm.retrieval.adaptive import Adaptive
from knnlm.retrieval.pointers import Pointers, PointerState, check_pointers
from knnlm.run.decode import (
    Decoder,
    GenerationRequest,
    MixState,
    Neighbor,
    Retrieval,
    SequenceState,
    StreamEvent,
    TokenScore,
    check_sampling,
    next_distributions,
    parse_stops,
    settings_of,
    target_knn_logprobs,
)
from knnlm.run.continuous import CACHE_KEY_POINT, CacheUse, cache_use, vocab_rows
from knnlm.run.explain import neighbor_weights
from knnlm.run.options import CacheSettings, MixSettings, RetrievalSettings, Sampling, call_overrides, fold
from knnlm.run.processor import KNNLogitsProcessor
from knnlm.scale import open_datastore, open_searcher

LOG = logging.getLogger(__name__)


class _Default:
    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT = _Default()  # `datastore=DEFAULT`: the KNNLM's default datastore; None: the base LM


# ---- results -------------------------------------------------------------------------
@dataclass
class TextScore:
    """Per-token scores of a text: every token after the first (which has no context)."""

    ids: list[int]
    tokens: list[TokenScore]
    settings: dict
    following: tuple | None = field(default=None, repr=False)  # score(following=True): see there
    attributed: object = field(default=None, repr=False)  # computes the attribution when first asked
    doc_info: Sequence[dict] | None = field(default=None, repr=False)  # the datastore's documents (titles)
    # every token's k neighbours as searched, nearest first: distances (T-1, k) float32 (NaN
    # where no search ran), whether each one's value is the token (T-1, k) bool, and the
    # entries' counts (T-1, k) of a pruned datastore (None: each counts once); None without one
    search: tuple | None = field(default=None, repr=False)

    @property
    def ppl(self) -> float:
        return perplexity([t.logprob for t in self.tokens])

    def attribution(self) -> Attribution | None:
        """Which documents of the datastore the tokens' probabilities came from, with every
        neighbour's contribution (knnlm.core.attribution); None without a datastore."""
        if callable(self.attributed):
            self.attributed = self.attributed()
        return self.attributed

    def documents(self, top: int | None = None) -> list[dict]:
        """The per-document summary (`Attribution.table`): the `top` documents that carried
        the most weight, with title and source; [] without a datastore."""
        a = self.attribution()
        return [] if a is None else a.table(self.doc_info, top)

    @property
    def ppl_lm(self) -> float:
        return perplexity([t.logprob_lm for t in self.tokens])


@dataclass
class Generation:
    text: str
    tokens: list[TokenScore]
    prompt_ids: list[int]
    finish_reason: str
    settings: dict

    @property
    def ids(self) -> list[int]:
        return [t.id for t in self.tokens]


@dataclass
class NextToken:
    """The next-token distribution after a prefix, as log-probs over the vocabulary (V,)."""

    mix: torch.Tensor  # (V,) log p_kNN-LM
    lm: torch.Tensor  # (V,) log p_LM
    knn: torch.Tensor | None  # (V,) log p_kNN; None without a datastore
    neighbors: list[Neighbor]
    decode: object = field(repr=False)

    def top(self, n: int = 10) -> list[tuple[str, float]]:
        """The n most likely tokens and their probabilities under the mixture."""
        p, ids = torch.topk(self.mix.exp(), n)
        return [(self.decode([i]), float(q)) for i, q in zip(ids.tolist(), p)]


# ---- settings ------------------------------------------------------------------------
# ---- sampling ------------------------------------------------------------------------
# ---- the model -----------------------------------------------------------------------
class KNNLM:
    """A loaded LM with named datastores.  Not thread-safe: one caller at a time
    (the server gives the model to a single worker thread)."""

    def __init__(self, lm, datastores: Mapping[str, str | Path] | None = None, default: str | None = None, *,
                 memories: Mapping[str, str | Path] | None = None, default_memory: str | None = None,
                 retrieval: RetrievalSettings | None = None, mixing: MixSettings | None = None,
                 cache: CacheSettings | None = None, context: int = 24, **flat):
        """`retrieval`, `mixing` and `cache` (knnlm.run.options) are every call's defaults (None
        fields: each datastore's tuned settings, its tuned cache λ, each decoder's tuned λ); the flat
        names of their fields (lam=, k=, knn_temperature=, index=, lambda_mode=, cache_lambda=, ...) work too."""
        if "temperature" in flat:  # the kNN temperature is knn_temperature here (temperature is sampling's)
            raise TypeError("KNNLM() got an unexpected keyword argument 'temperature'")
        if "knn_temperature" in flat:
            flat["temperature"] = flat.pop("knn_temperature")
        retrieval, mixing, self.cache_settings = fold("KNNLM", flat, retrieval=retrieval, mixing=mixing, cache=cache)
        if retrieval.actors:
            raise KnnlmError("KNNLM searches in process (Ray search actors are `evaluate`'s)")
        self.cache_lambda = mixing.cache_lambda  # None: each datastore's tuned cache λ when above 0, else no cache
        lam, k, knn_temperature = mixing.lam, retrieval.k, retrieval.temperature
        index, nprobe, rerank, paper_defaults = retrieval.index, retrieval.nprobe, retrieval.rerank, retrieval.paper_defaults
        memory_lambda = mixing.memory_lambda
        self.lambda_mode = mixing.mode  # None: adaptive unless lam is given (knnlm.core.settings.resolve)
        self.lambda_by_distance = mixing.by_distance  # None: the datastore's λ-by-distance table when recorded
        self.pointers, self.adaptive = _checked(retrieval.pointers, retrieval.adaptive)  # every call's (None: off)
        self.lm = lm
        self.searchers: dict[str, Searcher] = {}
        # defaults of every call; None: each datastore's tuned setting (the paper's with paper_defaults)
        self.lam, self.k, self.knn_temperature = lam, k, knn_temperature
        self.paper_defaults = paper_defaults
        self.context = context  # tokens of a neighbour's document shown before it
        self._disabled = False
        for name, path in (datastores or {}).items():
            self.add_datastore(name, path, index=index, nprobe=nprobe, rerank=rerank)
        if default is not None and default not in self.searchers:
            raise KnnlmError(f"default datastore {default!r} is not loaded (have: {self._names()})")
        self.default = default if default is not None else next(iter(self.searchers), None)
        # memory decoders (knnlm.memory), by name like datastores; the default one mixes into every call
        self.memories: dict[str, MemoryDecoder] = {}
        self.memory_lambda = memory_lambda  # None: each decoder's tuned λ (knnlm.memory.mix.memory_weight)
        for name, path in (memories or {}).items():
            self.add_memory(name, path)
        if default_memory is not None and default_memory not in self.memories:
            raise KnnlmError(f"default memory decoder {default_memory!r} is not loaded "
                             f"(have: {', '.join(self.memories) or 'none'})")
        self.default_memory = default_memory if default_memory is not None else next(iter(self.memories), None)

    @classmethod
    def load(cls, model: str | None = None, datastores: Mapping[str, str | Path] | None = None,
             dtype: str | None = None, device: str = "cpu", **kwargs) -> "KNNLM":
        """Load the model (default: the first datastore's, else smollm2-135m) and the datastores."""
        from knnlm.core.model import DEFAULT_MODEL, LM

        meta = open_datastore(next(iter(datastores.values()))).meta if datastores else {}
        model = model or meta.get("identity", {}).get("model") or DEFAULT_MODEL
        lm = LM.load(model, dtype=dtype or meta.get("model_dtype") or "float32", device=device,
                     key_point=meta.get("key_point", "ffn_input"))
        return cls(lm, datastores, **kwargs)

    def add_datastore(self, name: str, path: str | Path, index: str | None = None, nprobe: int | None = None,
                      rerank: bool | None = None) -> None:
        """Open a datastore built with this model (any key point) under `name`."""
        if not name or "=" in name:
            raise KnnlmError(f"invalid datastore name {name!r}")
        if name in self.searchers:
            raise KnnlmError(f"datastore name {name!r} is used twice")
        ds = open_datastore(path)
        ds.check_compatible(self.lm.identity(ds.key_point))
        self.searchers[name] = open_searcher(ds, index, nprobe=nprobe, rerank=rerank, device=str(self.lm.device))
        LOG.info("datastore %s: %s (%d entries, key point %s)", name, ds.path, ds.count, ds.key_point)

    def reload_datastore(self, name: str) -> None:
        """Open datastore `name` again from its directory (after an edit, knnlm.core.edit) with
        the same index settings, and put it in place in one step: a call that already resolved
        its retrieval keeps the version it started with, later calls get the new one."""
        if name not in self.searchers:
            raise KnnlmError(f"unknown datastore {name!r} (loaded: {self._names()})")
        old = self.searchers[name]
        how = old.settings()
        ds = open_datastore(old.ds.path)
        self.searchers[name] = open_searcher(ds, how.get("index"), nprobe=how.get("nprobe"), rerank=how.get("rerank"),
                                             device=str(self.lm.device))
        LOG.info("datastore %s: version %d (%d entries)", name, getattr(ds, "version", 0), ds.count)

    def add_memory(self, name: str, path: str | Path) -> None:
        """Load a memory decoder of this model's tokenizer under `name`."""
        if not name or "=" in name or name in self.memories:
            raise KnnlmError(f"invalid or repeated memory decoder name {name!r}")
        self.memories[name] = MemoryDecoder.load_for(self.lm, path)

    def memory_use(self, memory=DEFAULT, memory_lambda: float | None = None) -> MemoryUse | None:
        """A call's memory decoder (None: none, or disabled) and its lambda."""
        check_memory_lambda(memory_lambda)
        name = self.default_memory if memory is DEFAULT else memory
        if name is None or self._disabled:
            return None
        if name not in self.memories:
            raise KnnlmError(f"unknown memory decoder {name!r} (loaded: {', '.join(self.memories) or 'none'})")
        dec = self.memories[name]
        w = memory_weight(dec.meta, self.memory_lambda if memory_lambda is None else memory_lambda, self.lambda_mode,
                          str(dec.path))
        return MemoryUse(name, dec, w.lam, w.adapt)

    def cache_use(self, r: Retrieval | None, cache_lambda: float | str | None = None) -> CacheUse | None:
        """A call's continuous cache (knnlm.run.continuous; None: none, or disabled), mixed
        after `r`'s datastore: by default with the λ that datastore tuned for it."""
        lam = self.cache_lambda if cache_lambda is None else cache_lambda
        if self._disabled or (lam is None and self.paper_defaults):
            return None
        return cache_use(r.ds.meta if r is not None else None, lam, self.lambda_mode, self.cache_settings)

    @property
    def datastores(self) -> dict[str, Datastore]:
        return {name: s.ds for name, s in self.searchers.items()}

    def _names(self) -> str:
        return ", ".join(self.searchers) or "none"

    @contextlib.contextmanager
    def disabled(self) -> Iterator["KNNLM"]:
        """Inside, every call uses the base LM alone, whatever datastore or memory it names."""
        old, self._disabled = self._disabled, True
        try:
            yield self
        finally:
            self._disabled = old

    def retrieval(self, datastore=DEFAULT, lam: float | None = None, k: int | None = None,
                  knn_temperature: float | None = None, pointers=DEFAULT, adaptive=DEFAULT) -> Retrieval | None:
        """Resolve a call's settings: None means the base LM (no datastore, or disabled).
        pointers / adaptive: DEFAULT takes the KNNLM's, None turns them off."""
        check_settings(lam=lam, temperature=knn_temperature, k=k)
        pointers, adaptive = _checked(self.pointers if pointers is DEFAULT else pointers,
                                      self.adaptive if adaptive is DEFAULT else adaptive)
        name = self.default if datastore is DEFAULT else datastore
        if name is None or self._disabled:
            return None
        if name not in self.searchers:
            raise KnnlmError(f"unknown datastore {name!r} (loaded: {self._names()})")
        s = self.searchers[name]
        check_pointers(s.ds, pointers)
        r = resolve(s.ds.meta, s.ds.count, self.k if k is None else k, self.lam if lam is None else lam,
                    self.knn_temperature if knn_temperature is None else knn_temperature,
                    paper=self.paper_defaults, name=name,
                    lambda_mode=self.lambda_mode, by_distance=self.lambda_by_distance)
        if r.k > s.ds.count:
            raise KnnlmError(f"k={r.k} is larger than datastore {name!r} ({s.ds.count} entries)")
        return Retrieval(name, s, r.lam, r.k, r.temperature, pointers, adaptive, r.adapt, r.by_distance)

    def prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        """Token ids of a prompt: a string gets the prefix token (BOS) first; ids are kept as given."""
        ids = self.lm.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
        if not ids:
            raise KnnlmError("empty prompt (and the tokenizer has no BOS/EOS token to start from)")
        bad = [i for i in ids if not 0 <= i < self.lm.vocab_size]
        if bad:
            raise KnnlmError(f"token id {bad[0]} is outside the vocabulary (0 to {self.lm.vocab_size - 1})")
        return ids

    def check_length(self, n_prompt: int, max_new_tokens: int) -> None:
        """The prompt and the tokens to generate must fit the model's context."""
        limit = self.lm.max_positions
        if limit and n_prompt + max_new_tokens > limit:
            asked = f"the prompt has {n_prompt}" + (f" and max_new_tokens is {max_new_tokens}" if max_new_tokens else "")
            raise KnnlmError(f"too many tokens: {asked}, but {self.lm.name} reads at most {limit}")

    # ---- scoring -----------------------------------------------------------------------
    @torch.inference_mode()
    def score(self, text: str | Sequence[int], datastore=DEFAULT, *, retrieval: RetrievalSettings | None = None,
              mixing: MixSettings | None = None, memory=DEFAULT, neighbors: int = 0, top_logprobs: int = 0,
              following: bool = False, **flat) -> TextScore:
        """log p of every token of `text` given the ones before it, in one forward pass.

        A string gets the prefix token first and every one of its tokens is scored; a
        list of ids is scored from its second id on.  `neighbors` > 0 attaches that many
        nearest neighbours (with their kNN weight) to each token; `top_logprobs` > 0 the
        most likely tokens at each position under the mixture (`TokenScore.top`).  With
        pointers or adaptive retrieval the tokens are looked up left to right, as generation would.
        `following=True` (plain retrieval only) also keeps the distributions of the token
        after the text, from the same pass: `TextScore.following` = (mix, lm, knn, dists,
        ids), what `SequenceState.advance` takes to pick a first generated token.
        A memory decoder (`memory`, `memory_lambda`) is mixed on top of the (kNN-)LM.
        The mixing is generation's (knnlm.core.mix): λ adapts from its setting as the text is
        read (`lambda_mode`), as `knnlm eval` does, and the `following` distributions use the
        λ the text ended with, as generation after this text as a prompt would.
        `retrieval` / `mixing`: this call's k, kNN temperature, pointers, adaptive retrieval,
        λ and memory λ (None fields: the KNNLM's); their flat names work too.
        """
        over, _ = call_overrides("score", flat, retrieval, mixing)
        memory_lambda, cache_lambda = over.pop("memory_lambda", None), over.pop("cache_lambda", None)
        r = self.retrieval(datastore, **over)
        m = self.memory_use(memory, memory_lambda)
        c = self.cache_use(r, cache_lambda)
        if neighbors < 0 or top_logprobs < 0:
            raise KnnlmError(f"neighbors and top_logprobs must be >= 0, got {neighbors} and {top_logprobs}")
        ids = self.prompt_ids(text)
        self.check_length(len(ids), 0)
        if len(ids) < 2:
            raise KnnlmError("nothing to score: the text has no token after the first")
        kps = sorted(({r.ds.key_point} if r else set()) | ({CACHE_KEY_POINT} if c else set()))
        keys, logits = self.lm.forward(torch.tensor([ids]), kps, logits=True)  # logits (1, T, V)
        targets = torch.tensor(ids[1:], device=logits.device)  # (T-1,)
        lm_all = torch.log_softmax(logits[0, :-1].float(), -1)  # (T-1, V)
        lm_lp = lm_all.gather(1, targets[:, None])[:, 0].cpu().numpy().astype(np.float64)  # (T-1,)
        knn_lp, dists, nids, after = None, None, None, None
        if r is not None:
            plain = r.pointers is None and r.adaptive is None
            if following and not plain:
                raise KnnlmError("score(following=True) needs plain retrieval (no pointers, no adaptive)")
            q = keys[r.ds.key_point][0, : None if following else -1].float().cpu().numpy()  # (T or T-1, d)
            if plain:
                dists, nids = r.searcher.search(q, r.k)  # (T or T-1, k)
                if following:
                    dists, nids, after = dists[:-1], nids[:-1], (dists[-1:], nids[-1:])  # (T-1, k); (1, k)
            else:
                dists, nids = _left_to_right(r, q, logits[0, :-1], ids[1:])
            knn_lp = target_knn_logprobs(r, dists, nids, np.array(ids[1:]))  # NaN where skipped: p_LM alone
        mem_lp = mem_logits = mem_all = None
        if m is not None:
            _, mem_logits = m.decoder.lm.forward(torch.tensor([ids]), [], logits=True)  # (1, T, V_mem)
            mem_all = torch.log_softmax(mem_logits[0, :-1].float(), -1)  # (T-1, V_mem)
            mem_lp = mem_all.gather(1, targets[:, None].to(mem_all.device))[:, 0].cpu().numpy().astype(np.float64)
        mixing = MixState(r, m, c)  # the one mixer, as generation uses it: λ read from the tokens so far
        cache_lp = cache_all = None
        if c is not None:  # the continuous cache: each position's entries are the text's earlier ones
            h = keys[CACHE_KEY_POINT][0].float().cpu().numpy()  # (T, d)
            cache_lp = mixing.cache.targets(h, ids)  # (T-1,) NaN at the first position
            mixing.cache.feed(h, ids)
            cache_all = (lambda: vocab_rows(h, ids, c, lm_all.shape[-1])) if top_logprobs else None
        lm_max = lm_all.max(-1).values.cpu().numpy()  # (T-1,) the LM's confidence at each position
        omega, mems = mixing.read(lm_lp, knn_lp, mem_lp, None if dists is None else dists[:, 0], lm_max,
                                  cache_lp)  # (T-1, J)
        mix = mix_targets(lm_lp, mems, omega)
        tops = (self._top_rows(lm_all, r, dists, nids, omega, top_logprobs, mem_all, cache_all and cache_all())
                if top_logprobs else [{} for _ in mix])
        tokens = []
        for i, t in enumerate(ids[1:]):
            found = knn_lp is not None and not np.isnan(knn_lp[i])
            nb = self.neighbors_of(r, dists[i], nids[i], neighbors) if found and neighbors else []
            text_i, top = self.lm.decode([t]), tops[i]
            if text_i in top and abs(top[text_i] - mix[i]) < 1e-4:
                top[text_i] = float(mix[i])  # the token's own value, exactly (a greedy token is the top one)
            tokens.append(TokenScore(t, text_i, float(mix[i]), float(lm_lp[i]),
                                     None if knn_lp is None or not found else float(knn_lp[i]), nb, top,
                                     logprob_memory=None if mem_lp is None else float(mem_lp[i]),
                                     logprob_lm_max=float(lm_max[i]),
                                     logprob_cache=None if cache_lp is None else float(cache_lp[i])))
        nxt = None
        if following:
            d, n = after if after is not None else (None, None)
            nxt = (*next_distributions(logits[0, -1], r, d, n, m, None if m is None else mem_logits[0, -1], mixing),
                   d, n)
        out = TextScore(ids, tokens, {**settings_of(r), **(c.settings() if c else {}), **(m.settings() if m else {})},
                        nxt)
        if r is not None:
            lams = omega[:, 0]  # the datastore's share of each position's mixture
            out.attributed = lambda: attribute_neighbors(r.ds, dists, nids, np.array(ids[1:]), lams, r.temperature)
            out.doc_info = r.ds.doc_info
            hits = (r.ds.vals[np.maximum(nids, 0)] == np.array(ids[1:])[:, None]) & (nids >= 0)
            out.search = (dists, hits, r.ds.counts_of(nids))
        return out

    def _top_rows(self, lm_all: torch.Tensor, r: Retrieval | None, dists: np.ndarray | None,
                  nids: np.ndarray | None, omega: np.ndarray, n: int, mem_all: torch.Tensor | None = None,
                  cache_all: torch.Tensor | None = None, chunk: int = 256) -> list[dict[str, float]]:
        """The n most likely tokens of each row's mixture: lm_all (m, V) log p_LM, the rows'
        neighbours (m, k), the continuous cache's log p_cache (m, V) and a memory decoder's
        log p_mem (m, V_mem), mixed with each row's weights omega (m, J) (knnlm.core.mix);
        (chunk, V) of p_kNN at a time."""
        out = []
        for i in range(0, lm_all.shape[0], chunk):
            lm = lm_all[i : i + chunk].cpu()  # (c, V)
            mems = []
            if r is not None:
                vals = r.ds.vals[np.maximum(nids[i : i + chunk], 0)]  # (c, k)
                mems.append(knn_distribution(dists[i : i + chunk], vals, lm.shape[-1], r.temperature,
                                             r.ds.counts_of(nids[i : i + chunk])))
            if cache_all is not None:
                mems.append(cache_all[i : i + chunk])
            if mem_all is not None:
                mems.append(align_vocab(mem_all[i : i + chunk].cpu(), lm.shape[-1]))  # (c, V)
            mix = mix_vocab(lm, mems, omega[i : i + chunk])
            out += [self.top_tokens(row, n) for row in mix]
        return out

    def next_token_distribution(self, prefix: str | Sequence[int], datastore=DEFAULT, *,
                                retrieval: RetrievalSettings | None = None, mixing: MixSettings | None = None,
                                memory=DEFAULT, neighbors: int = 0, **flat) -> NextToken:
        """p(next token | prefix) under the LM, p_kNN and their mixture (with a memory decoder's on top)."""
        over, _ = call_overrides("next_token_distribution", flat, retrieval, mixing)
        memory_lambda, cache_lambda = over.pop("memory_lambda", None), over.pop("cache_lambda", None)
        r = self.retrieval(datastore, **over)
        m = self.memory_use(memory, memory_lambda)
        ids = self.prompt_ids(prefix)
        self.check_length(len(ids), 1)
        step = Decoder(self.lm, r, m, MixState(r, m, self.cache_use(r, cache_lambda)))
        step.feed(ids)
        mix, lm_lp, knn_lp = step.distribution()
        nb = self.neighbors_of(r, step.dists[0], step.ids[0], neighbors) if r is not None and neighbors else []
        return NextToken(mix, lm_lp, knn_lp, nb, self.lm.decode)

    # ---- generation --------------------------------------------------------------------
    def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 64, sampling: Sampling | None = None,
                 **options) -> Generation:
        """Generate a continuation; the options are `prepare`'s.  Returns the text (stop
        string trimmed), every token with its scores, and why it stopped."""
        req = self.prepare(prompt, max_new_tokens, sampling, **options)
        return _generation(req, list(self.run(req)))

    def stream(self, prompt: str | Sequence[int], max_new_tokens: int = 64, sampling: Sampling | None = None,
               **options) -> Iterator[StreamEvent]:
        """Generate token by token with the KV cache, yielding a StreamEvent per token and a
        last one with the finish reason; the events' texts add up to the completion.

        Options are `prepare`'s.  Generation ends at EOS, at a stop string or after
        max_new_tokens.  Every setting is checked here, before the first token.
        """
        return self.run(self.prepare(prompt, max_new_tokens, sampling, **options))

    def prepare(self, prompt: str | Sequence[int], max_new_tokens: int = 64, sampling: Sampling | None = None, *,
                datastore=DEFAULT, memory=DEFAULT, retrieval: RetrievalSettings | None = None,
                mixing: MixSettings | None = None, **flat) -> GenerationRequest:
        """Check a generation request and tokenize its prompt; `run` generates it.
        `sampling` (knnlm.run.options.Sampling: temperature, top_k, top_p, seed, stop,
        ignore_eos, neighbors, top_logprobs, report_eos; default greedy), the datastore
        (None: the base LM) and memory decoder to use, and this call's `retrieval` /
        `mixing` (k, kNN temperature, pointers, adaptive, λ, memory λ; None fields: the
        KNNLM's).  The flat names of all of these (temperature=, stop=, lam=, k=, ...) work too."""
        over, sp = call_overrides("prepare", flat, retrieval, mixing, sampling, sampling_names=True)
        check_sampling(sp.temperature, sp.top_k, sp.top_p, max_new_tokens)
        stops = parse_stops(sp.stop)
        memory_lambda, cache_lambda = over.pop("memory_lambda", None), over.pop("cache_lambda", None)
        r = self.retrieval(datastore, **over)
        m = self.memory_use(memory, memory_lambda)
        ids = self.prompt_ids(prompt)
        self.check_length(len(ids), max_new_tokens)
        return GenerationRequest(ids, r, max_new_tokens, sp.temperature, sp.top_k, sp.top_p, stops, sp.seed,
                                 sp.ignore_eos, sp.neighbors, sp.top_logprobs, sp.report_eos, m,
                                 self.cache_use(r, cache_lambda))

    def run(self, req: GenerationRequest) -> Iterator[StreamEvent]:
        """Generate a prepared request (see `stream`)."""
        seq = SequenceState(self, req)
        step = Decoder(self.lm, req.r, req.m, seq.mixing)
        step.feed(req.ids)
        while True:
            events, tok = seq.advance(*step.distribution(seq.pointers), step.dists, step.ids)
            yield from events
            if tok is None:
                return
            step.feed([tok])

    def generate_many(self, prompts: Sequence[str | Sequence[int]], max_new_tokens: int = 64,
                      sampling: Sampling | None = None, max_batch: int = 8, **options) -> list[Generation]:
        """`generate` for several prompts at once, stepped together in batches of up to
        `max_batch` (one forward step of the batch and one search per datastore per
        token); the same options for every prompt.  Results are in the prompts' order."""
        from knnlm.run.batch import BatchGenerator

        reqs = [self.prepare(p, max_new_tokens, sampling, **options) for p in prompts]  # every prompt checked first
        events: list[list[StreamEvent]] = [[] for _ in reqs]
        batch, todo = BatchGenerator(self, max_batch), list(range(len(reqs)))[::-1]
        while todo or len(batch):
            while todo and batch.has_room():
                i = todo.pop()
                events[i] += batch.add(i, reqs[i])
            for i, evs in batch.step().items():
                events[i] += evs
        return [_generation(req, evs) for req, evs in zip(reqs, events)]

    # ---- HF generate -------------------------------------------------------------------
    @contextlib.contextmanager
    def logits_processor(self, datastore=DEFAULT, lam: float | None = None, k: int | None = None,
                         knn_temperature: float | None = None,
                         cache_lambda: float | str | None = None) -> Iterator[KNNLogitsProcessor]:
        """A LogitsProcessor for `lm.model.generate(..., logits_processor=[proc])`; the keys
        are read by a hook that lives as long as the `with` block."""
        r = self.retrieval(datastore, lam, k, knn_temperature)
        c = self.cache_use(r, cache_lambda)
        proc = KNNLogitsProcessor(self.lm, r, c)
        kps = ([r.ds.key_point] if r is not None else []) + ([CACHE_KEY_POINT] if c is not None else [])
        with contextlib.ExitStack() as stack:
            if kps:
                proc.captured = stack.enter_context(self.lm._capture(sorted(set(kps))))
            yield proc

    # ---- attribution -------------------------------------------------------------------
    def neighbors_of(self, r: Retrieval, dists: np.ndarray, ids: np.ndarray, n: int) -> list[Neighbor]:
        """The n nearest of one query's neighbours (dists, ids: (k,)) with their source."""
        w = neighbor_weights(dists, r.temperature)  # (k,)
        out = []
        for j in range(min(n, len(ids))):  # neighbours arrive nearest first
            entry = int(ids[j])
            if entry < 0:
                break
            left, value, right = r.ds.context(entry, before=self.context, after=8)
            doc, off = (int(x[0]) for x in r.ds.provenance(np.array([entry])))
            info = r.ds.doc_info[doc]
            out.append(Neighbor(r.name, entry, doc, info.get("title", ""), info.get("source", ""), off,
                                float(dists[j]), float(w[j]), self.lm.decode([value]), value,
                                self.lm.decode(left), self.lm.decode(right)))
        return out

    def top_tokens(self, logprobs: torch.Tensor, n: int) -> dict[str, float]:
        if n == 0:
            return {}
        lp, ids = torch.topk(logprobs, n)
        top: dict[str, float] = {}
        for i, v in zip(ids.tolist(), lp.tolist()):  # tokens that decode alike (partial bytes): the likeliest
            top.setdefault(self.lm.decode([i]), v)
        return top


def _checked(pointers, adaptive) -> tuple[Pointers | None, Adaptive | None]:
    if pointers is not None and not isinstance(pointers, Pointers):
        raise KnnlmError(f"pointers must be a knnlm.retrieval.pointers.Pointers or None, got {pointers!r}")
    if adaptive is not None and not isinstance(adaptive, Adaptive):
        raise KnnlmError(f"adaptive must be a knnlm.retrieval.adaptive.Adaptive or None, got {adaptive!r}")
    return pointers, adaptive


def _left_to_right(r: Retrieval, queries: np.ndarray, logits: torch.Tensor,
                   targets: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Neighbours (T, k) of a text's positions looked up one after the other, with r's
    pointers and adaptive retrieval; a skipped position's row is NaN / -1."""
    n = len(queries)
    dists = np.full((n, r.k), np.nan, dtype=np.float32)
    nids = np.full((n, r.k), -1, dtype=np.int64)
    state = PointerState(r.pointers) if r.pointers is not None else None
    for t in range(n):
        if r.skips(logits[t]):
            if state is not None:
                state.clear()
            continue
        dists[t : t + 1], nids[t : t + 1] = r.retrieve(queries[t : t + 1], [state])
        if state is not None:
            state.follow(nids[t], r.ds.vals[np.maximum(nids[t], 0)], int(targets[t]), r.ds.docs)
    return dists, nids


def _generation(req: GenerationRequest, events: list[StreamEvent]) -> Generation:
    tokens = [e.token for e in events if e.token is not None]
    return Generation("".join(e.text for e in events), tokens, req.ids, events[-1].finish_reason, req.settings)
