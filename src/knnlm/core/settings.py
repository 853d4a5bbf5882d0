"""Retrieval settings (k, λ, T): which ones a call uses.

A datastore carries settings tuned on its own corpus (`meta.json` "settings", written by
`knnlm build` or `knnlm tune --save`).  Every command resolves its settings the same way:

    explicit option  >  --paper-defaults  >  the datastore's recorded settings  >  the paper's

The paper's λ = 0.25, T = 1 fit a datastore made of the LM's own training data; on other
text they can make perplexity worse than the LM alone, hence the datastore's own first.

λ is "adaptive" (knnlm.core.adapt: starts at the resolved λ and follows the text being
scored, so a datastore that does not fit the text falls back to the LM) unless λ is given
explicitly or --paper-defaults is asked for, which use it "fixed", as written; `lambda_mode`
says so explicitly either way.  A datastore tuned with a λ-by-distance table
(knnlm.core.neighbor) has each position's λ read from its nearest neighbour's distance,
unless λ is given.

The continuous cache's λ resolves the same way (`cache_weight`): by default it is the λ
the datastore tuned for its cache on its own corpus (`settings.cache_lambda`), adapting to
the text, and no cache where that is 0 (the cache did not help there) or not recorded (a
datastore tuned before it was); "auto" is the recorded one, else DEFAULT_CACHE_LAMBDA,
adapting; a number is used fixed, as written (0: no cache).  Its similarity scale θ and
size resolve alike (`cache_params`): given > the datastore's tuned `cache_theta` /
`cache_size` > DEFAULT_CACHE_THETA / DEFAULT_CACHE_SIZE.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from knnlm.core.adapt import MODES
from knnlm.core.mix import Weight
from knnlm.core.neighbor import DistanceLambda
from knnlm.core.scoring import check_settings
from knnlm.errors import KnnlmError

LOG = logging.getLogger(__name__)

PAPER = {"k": 1024, "lambda": 0.25, "temperature": 1.0}  # Khandelwal et al. 2020, in-domain
DEFAULT_CACHE_LAMBDA = 0.05  # the cache's λ where no datastore tuned one (it adapts from there)
CACHE_LAMBDAS = (0.0, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3)  # swept by self-tuning
DEFAULT_CACHE_THETA = 0.05  # scale of the dot product h_t . h_i where no datastore tuned one
DEFAULT_CACHE_SIZE = 8192  # positions of the document kept: more kept helping (WikiText-2 up to 2000, docs/results.md; the
# tuning novels, θ 0.02, λ 0.02 adapting: 27.703 at 2000, 27.604 at 4000, 27.591 at 8000 positions)
# θ swept by self-tuning: about a factor 2 apart (perplexity is smooth in log θ), around the
# best of a model whose final hidden states have norm ~44 (SmolLM2-135M: 0.01-0.02, so
# θ h.h' is in the tens), the old fixed 0.05 among them, and 0.1 for models with smaller states
CACHE_THETAS = (0.005, 0.01, 0.02, 0.05, 0.1)
_hinted: set[str] = set()


@dataclass(frozen=True)
class Resolved:
    k: int
    lam: float
    temperature: float
    source: str  # where the settings not given explicitly came from: "datastore", "paper" or "explicit"
    adapt: bool = False  # λ adapts to the text being scored (knnlm.core.adapt), starting from `lam`
    by_distance: DistanceLambda | None = None  # λ read from the nearest neighbour's distance (knnlm.core.neighbor)

    @property
    def mode(self) -> str:
        return "adaptive" if self.adapt else "fixed"

    def as_dict(self) -> dict:
        return {"k": self.k, "lambda": self.lam, "lambda_mode": self.mode, "temperature": self.temperature,
                "settings_source": self.source,
                **({"lambda_by_distance": self.by_distance.as_dict()} if self.by_distance else {})}


def recorded(meta: dict) -> dict | None:
    """The datastore's tuned settings, or None (built before knnlm recorded them, or --no-tune)."""
    s = meta.get("settings")
    if not isinstance(s, dict) or not all(isinstance(s.get(f), (int, float)) for f in ("k", "lambda", "temperature")):
        return None
    return s


def resolve(meta: dict | None, count: int | None = None, k: int | None = None, lam: float | None = None,
            temperature: float | None = None, paper: bool = False, name: str = "",
            lambda_mode: str | None = None, by_distance: bool | None = None) -> Resolved:
    """The settings a call uses (see the module doc).  `count` (the datastore's size) caps
    a k that was not given explicitly; an explicit k above it is the caller's error to report.
    `lambda_mode` "adaptive" or "fixed"; None: adaptive unless `lam` is given or `paper`.
    `by_distance`: the datastore's recorded λ-by-distance table (knnlm.core.neighbor) as the
    base λ of each position; None: when recorded and λ is not given; False: never."""
    check_settings(lam=lam, temperature=temperature, k=k)
    check_lambda_mode(lambda_mode)
    given = {"k": k, "lambda": lam, "temperature": temperature}
    base, source = PAPER, "paper"
    if not paper and meta is not None:
        rec = recorded(meta)
        if rec is not None:
            base, source = rec, "datastore"
        elif name not in _hinted and None in given.values():
            _hinted.add(name)
            LOG.warning("datastore %s has no tuned settings: using the paper's (k=1024, lambda=0.25, T=1); "
                        "`knnlm tune HELDOUT.txt -d %s --save` records better ones", name, name)
    if None not in given.values():
        source = "explicit"
    out = {f: given[f] if given[f] is not None else base[f] for f in given}
    if k is None and count is not None:
        out["k"] = min(int(out["k"]), count)  # the default k shrinks to a small datastore
    adapt = lambda_mode == "adaptive" if lambda_mode is not None else (lam is None and not paper)
    table = None
    if source in ("datastore", "explicit") and not paper and by_distance is not False and (lam is None or by_distance):
        table = DistanceLambda.from_dict((recorded(meta or {}) or {}).get("lambda_by_distance"))
    return Resolved(int(out["k"]), float(out["lambda"]), float(out["temperature"]), source, adapt, table)


def check_lambda_mode(mode: str | None) -> None:
    if mode is not None and mode not in MODES:
        raise KnnlmError(f"lambda mode must be one of {', '.join(MODES)}, got {mode!r}")


def cache_weight(meta: dict | None, lam: float | str | None, lambda_mode: str | None = None) -> tuple[Weight | None, str]:
    """The continuous cache's λ policy and where it came from ("datastore", "default",
    "explicit"): `lam` None (the default) is the datastore's recorded cache λ when it is
    above 0, adaptive unless `lambda_mode` is "fixed", else no cache (None, "off": a
    datastore whose cache did not help its own text, or one tuned before the cache's λ was
    recorded); "auto" the recorded one (else DEFAULT_CACHE_LAMBDA), adapting likewise; a
    number is fixed unless `lambda_mode` is "adaptive"."""
    check_lambda_mode(lambda_mode)
    if lam is not None and lam != "auto":
        check_settings(lam=lam)
        return Weight(float(lam), lambda_mode == "adaptive"), "explicit"
    rec = (recorded(meta or {}) or {}).get("cache_lambda")
    ok = isinstance(rec, (int, float)) and not isinstance(rec, bool) and 0.0 <= rec <= 1.0
    if lam is None:
        return (Weight(float(rec), lambda_mode != "fixed"), "datastore") if ok and rec > 0 else (None, "off")
    return Weight(float(rec) if ok else DEFAULT_CACHE_LAMBDA, lambda_mode != "fixed"), "datastore" if ok else "default"


def cache_params(meta: dict | None, theta: float | None = None, size: int | None = None) -> tuple[float, int]:
    """The continuous cache's similarity scale θ and size: each as given, else the one the
    datastore tuned with its cache λ (`settings.cache_theta`, `settings.cache_size`), else
    DEFAULT_CACHE_THETA / DEFAULT_CACHE_SIZE (no datastore, or one tuned before they were)."""
    rec = (recorded(meta or {}) or {})
    if theta is None:
        t = rec.get("cache_theta")
        ok = isinstance(t, (int, float)) and not isinstance(t, bool) and t >= 0
        theta = float(t) if ok else DEFAULT_CACHE_THETA
    if size is None:
        z = rec.get("cache_size")
        ok = isinstance(z, (int, float)) and not isinstance(z, bool) and z >= 1 and int(z) == z
        size = int(z) if ok else DEFAULT_CACHE_SIZE
    return float(theta), int(size)
