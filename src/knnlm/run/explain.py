"""Which memories drove a prediction: the tokens where the datastore helped most, each
with its nearest neighbours shown in their source context (the paper's Table 6)."""

from __future__ import annotations

import numpy as np

from knnlm.core.mix import Weight, mix_text
from knnlm.core.attribution import Attribution, attribute_neighbors
from knnlm.core.attribution import knn_weights as neighbor_weights  # noqa: F401 (softmax(-d / T) of one row)
from knnlm.core.datastore import Datastore
from knnlm.run.evaluate import Scores


def explain(lm, ds: Datastore, scores: Scores, lam: float, temperature: float, top: int = 10,
            neighbors: int = 5, context: int = 24, min_context: int = 4, by: str = "log",
            adapt: bool = False, by_distance=None) -> list[dict]:
    """The `top` targets with the largest gain log p_kNN-LM - log p_LM (`by="prob"`: the
    largest p_kNN-LM - p_LM, the probability the datastore added), as dicts.  With `adapt`,
    λ adapts from `lam` as the text is read (knnlm.core.adapt), as `evaluate` does; with a
    `by_distance` table (knnlm.core.neighbor) each position's λ starts from its nearest distance.

    Targets with fewer than `min_context` tokens of their document before them are
    skipped: a document's first words are predicted from the same empty context everywhere.
    """
    plan = scores.plan
    mix, lams = knn_mixture(scores, lam, adapt, by_distance)
    if by not in ("log", "prob"):
        raise ValueError(f"by must be 'log' or 'prob', got {by!r}")
    gain = mix - scores.lm if by == "log" else np.exp(mix) - np.exp(scores.lm)
    doc_of = np.searchsorted(plan.docs[:, 2], np.arange(len(gain)), side="right") - 1
    offset = np.arange(len(gain)) - plan.docs[doc_of, 2] + 1
    gain = np.where(offset > min_context, gain, -np.inf)
    order = np.argsort(-gain, kind="stable")[: min(top, int(np.isfinite(gain).sum()))]
    out = []
    for i in order:
        i = int(i)
        doc, off = int(doc_of[i]), int(offset[i])  # the target is token `off` of document `doc`
        start = int(plan.docs[doc, 0])
        before = plan.tokens[start + max(1, off - context) : start + off]
        w = neighbor_weights(scores.dists[i], temperature)
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
            "lambda": float(lams[i]),
            "neighbors": rows,
        })
    return out


def knn_mixture(scores: Scores, lam: float, adapt: bool = False, by_distance=None) -> tuple[np.ndarray, np.ndarray]:
    """The kNN-LM's log p(target) (n,) and the datastore's weight at each position (n,), as
    `evaluate` mixes them (knnlm.core.mix; a `by_distance` table reads the nearest distances,
    and the LM's confidence when it was tuned with it)."""
    nearest = scores.nearest if scores.nearest is not None else (None if scores.dists is None else scores.dists[:, 0])
    base = None if by_distance is None or nearest is None else by_distance(nearest, scores.lm_max)[:, None]
    mix, omega, _ = mix_text(scores.lm, scores.knn[:, None], [Weight(lam, adapt)], base)
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
