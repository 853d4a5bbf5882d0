"""A memory decoder's λ, tuned when it is trained: on the pieces of its corpus held out from
training, the LM and the decoder score the same tokens and λ is swept (memory.mix); the best
one is recorded in memory.json ("settings") and every command defaults to it, adapting from
it as a text is read (knnlm.core.mix).  A decoder that does not help on its own held-out
text records λ = 0: the LM alone."""

from __future__ import annotations

import logging

import numpy as np
import torch

from knnlm.memory.mix import MEMORY_LAMBDAS, sweep_memory

LOG = logging.getLogger(__name__)


@torch.inference_mode()
def piece_logprobs(model, tokens: np.ndarray, rows: np.ndarray, batch: int = 8) -> np.ndarray:
    """log p(next token) of every position of the pieces rows (t0, _, m) (m tokens from t0,
    each predicting the next) under an HF causal LM; in piece order, (Σ m,)."""
    out = []
    device = next(model.parameters()).device
    for i in range(0, len(rows), batch):
        part = rows[i : i + batch]
        length = int(part[:, 2].max())
        x = np.zeros((len(part), length), dtype=np.int64)
        y = np.zeros((len(part), length), dtype=np.int64)
        for r, (t0, _, m) in enumerate(part):
            x[r, :m], y[r, :m] = tokens[t0 : t0 + m], tokens[t0 + 1 : t0 + m + 1]
        logits = model(input_ids=torch.from_numpy(x).to(device), use_cache=False).logits.float()  # (b, L, V)
        lp = torch.log_softmax(logits, -1).gather(2, torch.from_numpy(y).to(device)[..., None])[..., 0].cpu().numpy()
        out += [lp[r, :m] for r, (_, _, m) in enumerate(part)]
    return np.concatenate(out) if out else np.empty(0)


def tune_memory_lambda(lm, decoder_model, tokens: np.ndarray, held: np.ndarray, unit: str) -> dict | None:
    """The settings to record: the best λ on the held-out pieces (None without any)."""
    if not len(held):
        return None
    was = decoder_model.training
    decoder_model.eval()
    try:
        base = piece_logprobs(lm.model, tokens, held)
        mem = piece_logprobs(decoder_model, tokens, held)
    finally:
        decoder_model.train(was)
    res = sweep_memory(base.astype(np.float64), mem.astype(np.float64), MEMORY_LAMBDAS)
    best = res["best"]
    LOG.info("memory decoder λ tuned on %d held-out tokens: %.2f (ppl %.3f -> %.3f)", len(base), best["lambda"],
             res["ppl_base"], best["ppl"])
    return {"lambda": float(best["lambda"]), "how": f"held-out {unit}s of its corpus", "tokens": int(len(base)),
            "ppl_lm": float(res["ppl_base"]), "ppl_memory": float(best["ppl"])}
