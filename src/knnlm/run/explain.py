"""Which memories drove a prediction: the tokens where the datastore helped most, each
with its nearest neighbours shown in their source context (the paper's Table 6)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from knnlm.core.mix import Weight, mix_text
from knnlm.core.attribution import Attribution, attribute_neighbors
from knnlm.core.attribution import knn_weights as neighbor_weights  # noqa: F401 (softmax(-d / T) of one row)
from knnlm.core.datastore import Datastore
from knnlm.core.scoring import check_settings
from knnlm.core.settings import Resolved
from knnlm.errors import KnnlmError
from knnlm.run.evaluate import Scores


@dataclass(frozen=True)
class ExplainSettings:
    """What `explain` shows: the `top` targets with the largest gain (`by` "log": log
    p_kNN-LM - log p_LM; "prob": p_kNN-LM - p_LM, the probability the datastore added),
    each with its `neighbors` heaviest neighbours and up to `context` tokens before it.
    Targets with fewer than `min_context` tokens of their document before them are skipped:
    a document's first words are predicted from the same empty context everywhere."""

    top: int = 10
    neighbors: int = 5
    context: int = 24
    min_context: int = 4
    by: str = "log"

    def __post_init__(self):
        if self.top < 1 or self.neighbors < 0:
            raise KnnlmError(f"need top >= 1 and neighbors >= 0, got {self.top} and {self.neighbors}")
        if self.context < 1 or self.min_context < 0:
            raise KnnlmError(f"need context >= 1 and min_context >= 0, got {self.context} and {self.min_context}")
        if self.by not in ("log", "prob"):
            raise KnnlmError(f"by must be 'log' or 'prob', got {self.by!r}")


_MIXED = ("lam", "temperature", "adapt", "by_distance")  # flat names of the Resolved fields explain reads
_SHOWN = tuple(f.name for f in dataclasses.fields(ExplainSettings))


def explain(lm, ds: Datastore, scores: Scores, settings: Resolved | None = None,
            shown: ExplainSettings | None = None, cache: Weight | None = None, **flat) -> list[dict]:
    """The targets of `scores` (a `score_plan(keep_neighbors=True)` pass over `ds`) where
    the datastore helped most, as dicts, with their nearest neighbours in their source
    context (`shown`: how many and how ranked, ExplainSettings).  `settings`: the resolved
    settings the scores were made with (knnlm.core.settings.resolve): λ, adapting from
    there as the text is read when `adapt` (knnlm.core.adapt), as `evaluate` does; with a
    `by_distance` table (knnlm.core.neighbor) each position's λ starts from its nearest
    distance; T weighs the neighbours.  `cache`: the continuous cache's λ policy, mixed after
    the datastore as `evaluate` mixes it (the scores' `cache` log-probs; None: no cache).
    The flat keywords lam=, temperature=, adapt=, by_distance=, top=, neighbors=, context=,
    min_context=, by= are accepted too."""
    settings, shown = _fold(scores, settings, shown, flat)
    context, neighbors = shown.context, shown.neighbors
    plan = scores.plan
    mix, lams = knn_mixture(scores, settings.lam, settings.adapt, settings.by_distance, cache)
    gain = mix - scores.lm if shown.by == "log" else np.exp(mix) - np.exp(scores.lm)
    doc_of = plan.doc_of(np.arange(len(gain)))
    offset = np.arange(len(gain)) - plan.docs[doc_of, 2] + 1
    gain = np.where(offset > shown.min_context, gain, -np.inf)
    order = np.argsort(-gain, kind="stable")[: min(shown.top, int(np.isfinite(gain).sum()))]
    out = []
    for i in order:
        i = int(i)
        doc, off = int(doc_of[i]), int(offset[i])  # the target is token `off` of document `doc`
        start = int(plan.docs[doc, 0])
        before = plan.tokens[start + max(1, off - context) : start + off]
        w = neighbor_weights(scores.dists[i], settings.temperature)
        rows = []
        for j in np.argsort(-w, kind="stable")[:neighbors]:
            entry = int(scores.ids[i, j])
            if entry < 0:
                continue
            left, value, right = ds.context(entry, before=context)
            ndoc, noff = (int(x[0]) for x in ds.provenance(np.array([entry])))
            rows.append({
                "entry": entry,
                "document": ndoc,
                "title": ds.doc_info[ndoc].get("title", ""),
                "offset": noff,
                "distance": float(scores.dists[i, j]),
                "weight": float(w[j]),
                "value": lm.decode([value]),
                "matches_target": bool(value == scores.targets[i]),
                "context": lm.decode(left),
                "after": lm.decode(right),
            })
        out.append({
            "position": i,
            "document": doc,
            "offset": off,
            "context": lm.decode(before),
            "target": lm.decode([scores.targets[i]]),
            "p_lm": float(np.exp(scores.lm[i])),
            "p_knn": float(np.exp(scores.knn[i])),
            "p_knnlm": float(np.exp(mix[i])),
            **({"p_cache": float(np.exp(scores.cache[i]))} if cache is not None else {}),
            "lambda": float(lams[i]),
            "neighbors": rows,
        })
    return out


def _fold(scores: Scores, settings: Resolved | None, shown: ExplainSettings | None,
          flat: dict) -> tuple[Resolved, ExplainSettings]:
    """explain's settings with its flat keywords folded in (an unknown one: TypeError, as Python gives)."""
    unknown = [name for name in flat if name not in _MIXED + _SHOWN]
    if unknown:
        raise TypeError(f"explain() got an unexpected keyword argument {unknown[0]!r}")
    if settings is not None and not isinstance(settings, Resolved):
        raise TypeError(f"explain() settings must be a knnlm.core.settings.Resolved, got {type(settings).__name__}")
    if shown is not None and not isinstance(shown, ExplainSettings):
        raise TypeError(f"explain() shown must be an ExplainSettings, got {type(shown).__name__}")
    mixed = {name: flat[name] for name in _MIXED if name in flat}
    if settings is None:
        if "lam" not in mixed or "temperature" not in mixed:
            raise TypeError("explain() needs settings (the resolved λ and T) or lam= and temperature=")
        k = 0 if scores.dists is None else int(scores.dists.shape[1])
        settings = Resolved(k, mixed.pop("lam"), mixed.pop("temperature"), "explicit")
    settings = dataclasses.replace(settings, **mixed)
    check_settings(lam=settings.lam, temperature=settings.temperature)
    return settings, dataclasses.replace(shown or ExplainSettings(), **{n: flat[n] for n in _SHOWN if n in flat})


def knn_mixture(scores: Scores, lam: float, adapt: bool = False, by_distance=None,
                cache: Weight | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The kNN-LM's log p(target) (n,) and the datastore's weight at each position (n,), as
    `evaluate` mixes them (knnlm.core.mix; a `by_distance` table reads the nearest distances,
    and the LM's confidence when it was tuned with it); with a `cache` weight the continuous
    cache (`scores.cache`) is mixed after the datastore."""
    nearest = scores.nearest if scores.nearest is not None else (None if scores.dists is None else scores.dists[:, 0])
    mems, weights = [scores.knn], [Weight(lam, adapt)]
    if cache is not None:
        if scores.cache is None:
            raise KnnlmError("the scores have no continuous cache: score_plan(cache=CacheSettings(...))")
        mems.append(scores.cache)
        weights.append(cache)
    base = None
    if by_distance is not None and nearest is not None:
        base = np.stack([by_distance(nearest, scores.lm_max)] + [np.full(len(scores.lm), w.lam) for w in weights[1:]],
                        axis=1)
    mix, omega, _ = mix_text(scores.lm, np.stack(mems, axis=1), weights, base)
    return mix, omega[:, 0]


def attribute_scores(ds, scores: Scores, lam: float, temperature: float, adapt: bool = False,
                     by_distance=None) -> Attribution:
    """Which documents of `ds` the text's kNN-LM probabilities came from (knnlm.core.attribution),
    from a pass that kept its neighbours (`score_plan(keep_neighbors=True)`), with λ as
    `explain` and `evaluate` use it."""
    _, lams = knn_mixture(scores, lam, adapt, by_distance)
    return attribute_neighbors(ds, scores.dists, scores.ids, scores.targets, lams, temperature)


def _one_line(s: str) -> str:
    return s.replace("\n", "\\n").replace("|", "\\|")


def render(items: list[dict]) -> str:
    """Markdown that reads well in a terminal too."""
    lines = []
    for n, it in enumerate(items, 1):
        lines.append(
            f"### {n}. …{_one_line(it['context'])}**[{_one_line(it['target'])}]**\n\n"
            f"p_LM = {it['p_lm']:.4f}   p_kNN = {it['p_knn']:.4f}   p_kNN-LM = {it['p_knnlm']:.4f}\n"
        )
        lines.append("| weight | d | source | neighbour context → value |")
        lines.append("|---:|---:|---|---|")
        for r in it["neighbors"]:
            mark = "✓" if r["matches_target"] else " "
            lines.append(
                f"| {r['weight']:.3f} | {r['distance']:.1f} | {r['title'][:30]} @{r['offset']} | "
                f"…{_one_line(r['context'])[-60:]}**[{_one_line(r['value'])}]** {mark} |"
            )
        lines.append("")
    return "\n".join(lines)
