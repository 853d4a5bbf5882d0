"""The settings of a scoring or generation call, in small validated groups:

- `RetrievalSettings`: what a datastore search returns (k, the kNN temperature, the index
  and how it is searched, fewer searches with pointers or adaptive retrieval);
- `MixSettings`: how the LM and the memories are mixed (the datastore's λ and whether it
  adapts to the text, the continuous cache's and a memory decoder's λ);
- `WindowSettings`: how a text is cut into windows and batched;
- `CacheSettings`: the continuous cache's similarity scale and size;
- `Sampling`: how generation picks its tokens and what each one reports.

A field left None takes the datastore's recorded (self-tuned) setting, else the library's
default (`knnlm.core.settings.resolve`).  The command line's flags map onto these fields
one to one (`knnlm eval --help`).

    from knnlm import MixSettings, RetrievalSettings, evaluate
    evaluate(lm, ["test.txt"], "ds", retrieval=RetrievalSettings(k=64), mixing=MixSettings(lam=0.3))
    knn.generate("The history of", 32, Sampling(temperature=0.7, top_p=0.9), mixing=MixSettings(lam=0.5))
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

from knnlm.core.batching import WindowSettings
from knnlm.core.scoring import check_cache_settings, check_settings
from knnlm.core.settings import DEFAULT_CACHE_SIZE, DEFAULT_CACHE_THETA, check_lambda_mode  # noqa: F401
from knnlm.errors import KnnlmError
from knnlm.retrieval.adaptive import Adaptive
from knnlm.retrieval.pointers import Pointers

MAX_STOPS = 16


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, max_new_tokens: int) -> None:
    if not temperature >= 0:
        raise KnnlmError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise KnnlmError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise KnnlmError(f"top_p must be in (0, 1], got {top_p}")
    if max_new_tokens < 1:
        raise KnnlmError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


def parse_stops(stop: str | Sequence[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOPS or any(not isinstance(s, str) or not s for s in stops):
        raise KnnlmError(f"stop must be at most {MAX_STOPS} non-empty strings, got {stops!r}")
    return stops


@dataclass(frozen=True)
class RetrievalSettings:
    """What a datastore search returns and how it runs (None: the datastore's or the default)."""

    k: int | None = None
    temperature: float | None = None  # of p_kNN: softmax(-d / T)
    index: str | None = None  # an index of the datastore by name; None: its default
    nprobe: int | None = None
    rerank: bool | None = None  # exact distances from the stored keys (None: the index's default)
    pointers: Pointers | None = None  # RetoMaton: follow the last step's neighbours, search when too few
    adaptive: Adaptive | None = None  # skip the search where the LM is confident
    actors: int = 0  # a sharded datastore searched by this many Ray actors (0: in process)
    ray_address: str | None = None
    paper_defaults: bool = False  # the paper's k, λ, T instead of the datastore's tuned ones

    def __post_init__(self):
        check_settings(temperature=self.temperature, k=self.k)
        if self.nprobe is not None and self.nprobe < 1:
            raise KnnlmError(f"nprobe must be >= 1, got {self.nprobe}")
        if self.actors < 0:
            raise KnnlmError(f"search actors must be >= 0, got {self.actors}")
        if self.pointers is not None and not isinstance(self.pointers, Pointers):
            raise KnnlmError(f"pointers must be a knnlm.retrieval.pointers.Pointers or None, got {self.pointers!r}")
        if self.adaptive is not None and not isinstance(self.adaptive, Adaptive):
            raise KnnlmError(f"adaptive must be a knnlm.retrieval.adaptive.Adaptive or None, got {self.adaptive!r}")


@dataclass(frozen=True)
class MixSettings:
    """How the LM and the memories are mixed.  `lam`: the datastore's λ (None: its tuned one);
    `mode` "adaptive" (λ follows the text as it is read, knnlm.core.adapt) or "fixed"
    (None: adaptive unless `lam` is given); `cache_lambda`: the continuous cache mixed on
    top of the datastore (None: the datastore's tuned cache λ, adapting, when it recorded
    one above 0, else no cache; "auto": the tuned one, else 0.05, adapting; 0: no cache);
    `memory_lambda`: a memory decoder's λ (None: its default);
    `by_distance`: each position's λ read from its nearest neighbour's distance with the
    datastore's recorded table (knnlm.core.neighbor; None: when recorded and λ not given)."""

    lam: float | None = None
    mode: str | None = None
    by_distance: bool | None = None
    cache_lambda: float | str | None = None
    memory_lambda: float | None = None

    def __post_init__(self):
        check_settings(lam=self.lam)
        check_lambda_mode(self.mode)
        check_cache_settings(lam=self.cache_lambda)
        if self.memory_lambda is not None and not 0.0 <= self.memory_lambda <= 1.0:
            raise KnnlmError(f"memory lambda must be in [0, 1], got {self.memory_lambda}")


@dataclass(frozen=True)
class CacheSettings:
    """The continuous cache (Grave et al. 2017): p_cache ∝ exp(theta h_t . h_i) over the
    `size` previous positions of the same document.  None: the datastore's tuned θ / size,
    else DEFAULT_CACHE_THETA (0.05) / DEFAULT_CACHE_SIZE (8192) (knnlm.core.settings.cache_params)."""

    theta: float | None = None
    size: int | None = None

    def __post_init__(self):
        check_cache_settings(theta=self.theta, size=self.size)


# keyword arguments of the flat signatures these settings replaced: name -> (group, field)
LEGACY = {
    "k": ("retrieval", "k"), "temperature": ("retrieval", "temperature"), "index": ("retrieval", "index"),
    "nprobe": ("retrieval", "nprobe"), "rerank": ("retrieval", "rerank"), "pointers": ("retrieval", "pointers"),
    "adaptive": ("retrieval", "adaptive"), "search_actors": ("retrieval", "actors"),
    "ray_address": ("retrieval", "ray_address"), "paper_defaults": ("retrieval", "paper_defaults"),
    "lam": ("mixing", "lam"), "lambda_mode": ("mixing", "mode"), "cache_lambda": ("mixing", "cache_lambda"),
    "memory_lambda": ("mixing", "memory_lambda"), "lambda_by_distance": ("mixing", "by_distance"),
    "window": ("windows", "window"), "stride": ("windows", "stride"), "batch_tokens": ("windows", "batch_tokens"),
    "cache_theta": ("cache", "theta"), "cache_size": ("cache", "size"),
}
GROUPS = {"retrieval": RetrievalSettings, "mixing": MixSettings, "windows": WindowSettings, "cache": CacheSettings}


def fold(function: str, flat: dict, **groups):
    """The settings groups (`groups`: name -> instance or None) with the flat keyword
    arguments `flat` (the names of the signature these groups replaced) folded in, in the
    order of GROUPS.  An unknown name is a TypeError, as Python gives for any function."""
    changes: dict[str, dict] = {}
    for name, value in flat.items():
        if name not in LEGACY or LEGACY[name][0] not in groups:
            raise TypeError(f"{function}() got an unexpected keyword argument {name!r}")
        group, field = LEGACY[name]
        changes.setdefault(group, {})[field] = value
    out = []
    for name in groups:
        base = groups[name] if groups[name] is not None else GROUPS[name]()
        out.append(dataclasses.replace(base, **changes[name]) if name in changes else base)
    return out[0] if len(out) == 1 else tuple(out)


@dataclass(frozen=True)
class Sampling:
    """How generation picks each token: greedy at `temperature` 0, else drawn from
    softmax(log p / temperature) after `top_k` / `top_p` filtering (seeded with `seed`,
    None: random); it stops at a `stop` string (trimmed) or EOS (unless `ignore_eos`).
    Each token reports its `neighbors` nearest neighbours and the `top_logprobs` likeliest
    tokens; `report_eos` lists the EOS that ends a generation as its last token."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | Sequence[str] | None = None
    ignore_eos: bool = False
    neighbors: int = 0
    top_logprobs: int = 0
    report_eos: bool = False

    def __post_init__(self):
        check_sampling(self.temperature, self.top_k, self.top_p, 1)
        if self.neighbors < 0 or self.top_logprobs < 0:
            raise KnnlmError(f"neighbors and top_logprobs must be >= 0, got {self.neighbors} and {self.top_logprobs}")
        parse_stops(self.stop)


# a call's own retrieval and mixing (KNNLM.score, prepare, next_token_distribution): flat name -> (group, field)
CALL = {"lam": ("mixing", "lam"), "k": ("retrieval", "k"), "knn_temperature": ("retrieval", "temperature"),
        "pointers": ("retrieval", "pointers"), "adaptive": ("retrieval", "adaptive"),
        "memory_lambda": ("mixing", "memory_lambda"), "cache_lambda": ("mixing", "cache_lambda")}
_PER_CALL = {"retrieval": {"k", "temperature", "pointers", "adaptive"},
             "mixing": {"lam", "memory_lambda", "cache_lambda"}}


def call_overrides(function: str, flat: dict, retrieval: RetrievalSettings | None = None,
                   mixing: MixSettings | None = None, sampling: Sampling | None = None,
                   sampling_names: bool = False) -> tuple[dict, Sampling | None]:
    """A KNNLM call's settings: the overrides of the KNNLM's own (flat name -> value, only
    those given: a field left None in `retrieval` / `mixing` keeps the KNNLM's; a flat
    `pointers=None` turns them off for the call) and, with `sampling_names`, the Sampling
    with its flat names (temperature=, stop=, ...) folded in.  Fields set only when the
    KNNLM is made (index, λ mode, ...) are refused here."""
    out: dict = {}
    for name, group in (("retrieval", retrieval), ("mixing", mixing)):
        if group is None:
            continue
        cls = GROUPS[name]
        if not isinstance(group, cls):
            raise TypeError(f"{function}() {name} must be a {cls.__name__}, got {type(group).__name__}")
        default = cls()
        for f in dataclasses.fields(cls):
            value = getattr(group, f.name)
            if f.name not in _PER_CALL[name]:
                if value != getattr(default, f.name):
                    raise KnnlmError(f"{cls.__name__}.{f.name} is set when the KNNLM is made, not per call")
            elif value is not None:
                out[next(n for n, (g, x) in CALL.items() if (g, x) == (name, f.name))] = value
    if sampling is not None and not isinstance(sampling, Sampling):
        raise TypeError(f"{function}() sampling must be a Sampling, got {type(sampling).__name__}")
    fields = {f.name for f in dataclasses.fields(Sampling)} if sampling_names else set()
    picked = {}
    for name, value in flat.items():
        if name in CALL:
            out[name] = value
        elif name in fields:
            picked[name] = value
        else:
            raise TypeError(f"{function}() got an unexpected keyword argument {name!r}")
    if sampling_names:
        sampling = dataclasses.replace(sampling or Sampling(), **picked)
    return out, sampling
