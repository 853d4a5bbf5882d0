"""A memory decoder on disk and in memory: initialised from the base LM (a truncated copy:
its embeddings, its first L decoder layers, final norm and output head) or from any HF
model with the same tokenizer; saved as an HF model directory plus `memory.json`.

    memory.json   kind, format, base model and tokenizer fingerprints, how it was
                  initialised (L), the datastore and targets it imitates (ids, corpus
                  hashes), alpha, k, T, steps, losses

Loading checks that directory; plugging it into an LM checks that both share one
tokenizer (their fingerprints), naming both when they do not.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from knnlm.core.corpus import file_sha256
from knnlm.core.datastore import publish, write_json_atomic
from knnlm.errors import KnnlmError

LOG = logging.getLogger(__name__)

META = "memory.json"
FORMAT_VERSION = 1
_REQUIRED = ("kind", "format_version", "base_model", "tokenizer_fingerprint", "layers")


def num_layers(model) -> int:
    from knnlm.core.model import find_decoder_layers

    return len(find_decoder_layers(model))


def truncated_copy(base, layers: int, name: str = "the base model"):
    """A float32 copy of `base` (an HF causal LM) keeping its first `layers` decoder layers,
    embeddings, final norm and output head, with the same weights."""
    from transformers import AutoModelForCausalLM

    n = num_layers(base)
    if not 1 <= layers <= n:
        raise KnnlmError(f"a memory decoder of L={layers} layers cannot be cut from {name}, which has {n}")
    cfg = copy.deepcopy(base.config)
    cfg.num_hidden_layers = layers  # GPT-2's n_layer too (attribute map)
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = cfg.layer_types[:layers]
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    theirs = base.state_dict()
    mine = model.state_dict()
    missing = [k for k in mine if k not in theirs]
    if missing:
        raise KnnlmError(f"cannot cut a memory decoder from {name}: no weights for {', '.join(missing[:3])}")
    model.load_state_dict({k: theirs[k].detach().to(torch.float32).clone() for k in mine})
    return model


def init_decoder(lm, layers: int | None = 2, model: str | None = None):
    """(model, tokenizer, how) of a new memory decoder for `lm` (a knnlm LM): a truncated
    copy of lm's model, or the HF model `model` (id or path) if its tokenizer is lm's."""
    if model is None:
        return truncated_copy(lm.model, layers, lm.name), lm.tokenizer, {"init": "truncated", "layers": layers}
    from knnlm.core.model import LM

    other = LM.load(model, dtype="float32")
    check_tokenizers(other.tokenizer_fingerprint, model, lm.tokenizer_fingerprint, lm.name)
    return other.model, other.tokenizer, {"init": model, "layers": num_layers(other.model)}


def check_tokenizers(mine: str, my_name: str, theirs: str, their_name: str) -> None:
    if mine != theirs:
        raise KnnlmError(f"the memory decoder {my_name} has another tokenizer ({mine}) than the LM {their_name} "
                         f"({theirs}): a memory decoder only mixes with an LM of the same tokenizer")


def save_decoder(model, tokenizer, out: str | Path, meta: dict) -> Path:
    """Write an HF model directory + memory.json to `out` atomically (`.partial`, rename)."""
    out = Path(out)
    partial = out.with_name(out.name + ".saving")
    if partial.exists():
        shutil.rmtree(partial)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    sums = {f.name: file_sha256(f) for f in sorted(partial.iterdir()) if f.is_file()}
    write_json_atomic(partial / META, {"kind": "memory-decoder", "format_version": FORMAT_VERSION, **meta,
                                       "sha256": sums})
    publish(partial, out)
    return out


def verify_decoder(path: str | Path) -> list[str]:
    """Check each file of a memory decoder against the sha256 memory.json records (a
    flipped byte in the weights loads without error); returns the files checked."""
    path = Path(path)
    sums = read_meta(path).get("sha256", {})
    for name, digest in sums.items():
        if not (path / name).is_file():
            raise KnnlmError(f"memory decoder file missing: {path / name}")
        if file_sha256(path / name) != digest:
            raise KnnlmError(f"{name} in {path} does not match its checksum: the memory decoder is corrupted")
    return sorted(sums)


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        partial = path.with_name(path.name + ".partial")
        hint = f" (an unfinished training is in {partial}: run it again to resume)" if partial.exists() else ""
        raise KnnlmError(f"memory decoder not found: {path}{hint}")
    if not (path / META).exists():
        raise KnnlmError(f"not a memory decoder (no {META}): {path}")
    try:
        meta = json.loads((path / META).read_text("utf-8"))
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise KnnlmError(f"corrupted {META} in {path}: {e}") from None
    missing = [f for f in _REQUIRED if f not in meta]
    if meta.get("kind") != "memory-decoder" or missing:
        raise KnnlmError(f"corrupted {META} in {path}: " + (f"no {', '.join(missing)}" if missing else "not a "
                                                            "memory decoder"))
    if meta["format_version"] != FORMAT_VERSION:
        raise KnnlmError(f"memory decoder format {meta['format_version']} is not supported (this knnlm reads "
                         f"{FORMAT_VERSION}): {path / META}")
    return meta


def removed_since(meta: dict) -> int:
    """How many documents of the datastore a decoder was trained on have been removed from it
    since (its edit log, knnlm.core.edit); 0 when that datastore is gone or is another one."""
    try:
        ds = json.loads((Path(meta["datastore"]) / "meta.json").read_text("utf-8"))
        edits = ds.get("edits", [])
        mine = meta.get("datastore_id")
        if ds.get("id") != mine and not any(e.get("from_id") == mine for e in edits):
            return 0
        since = int(meta.get("datastore_version", 0))
        return sum(int(e.get("count", 0)) for e in edits if e.get("op") == "remove" and e.get("version", 0) > since)
    except (KeyError, OSError, ValueError, TypeError, AttributeError):
        return 0


class MemoryDecoder:
    """A loaded memory decoder: a knnlm LM (its model and tokenizer) plus its metadata."""

    def __init__(self, lm, meta: dict, path: Path):
        self.lm, self.meta, self.path = lm, meta, path
        self.name = str(path)

    @classmethod
    def load(cls, path: str | Path, dtype: str = "float32", device: str = "cpu") -> "MemoryDecoder":
        from knnlm.core.model import LM

        path = Path(path)
        meta = read_meta(path)
        try:
            lm = LM.load(str(path), dtype=dtype, device=device)
        except KnnlmError as e:
            raise KnnlmError(f"corrupted memory decoder {path}: {e}") from None
        except Exception as e:  # a damaged weights file raises the loader's own errors
            raise KnnlmError(f"corrupted memory decoder {path}: {str(e).strip().splitlines()[0]}") from None
        if lm.tokenizer_fingerprint != meta["tokenizer_fingerprint"]:
            raise KnnlmError(f"corrupted memory decoder {path}: its tokenizer is not the one memory.json records")
        gone = removed_since(meta)
        if gone:
            LOG.warning("memory decoder %s was trained on %d document(s) since removed from %s: a decoder cannot "
                        "forget them (retrain it to)", path, gone, meta["datastore"])
        return cls(lm, meta, path)

    def check_compatible(self, lm) -> None:
        """Refuse an LM with another tokenizer, naming both."""
        check_tokenizers(self.lm.tokenizer_fingerprint, f"{self.path} (trained for {self.meta['base_model']})",
                         lm.tokenizer_fingerprint, lm.name)

    @classmethod
    def load_for(cls, lm, path: str | Path) -> "MemoryDecoder":
        """Load a decoder to run beside `lm`: its dtype and device, its tokenizer checked."""
        mem = cls.load(path, dtype=str(lm.dtype).replace("torch.", ""), device=str(lm.device))
        mem.check_compatible(lm)
        return mem

    @property
    def vocab_size(self) -> int:
        return self.lm.vocab_size


def align_vocab(logprobs: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Decoder log-probs (..., V_mem) on the LM's vocabulary (..., V): models of one tokenizer
    may pad their output layers differently; ids beyond the tokenizer never occur."""
    v = logprobs.shape[-1]
    if v == vocab_size:
        return logprobs
    if v < vocab_size:
        return torch.nn.functional.pad(logprobs, (0, vocab_size - v), value=-float("inf"))
    cut = logprobs[..., :vocab_size]
    return cut - torch.logsumexp(cut, dim=-1, keepdim=True)


@dataclass
class MemoryUse:
    """A call's memory decoder and its weight lam in p = lam p_mem + (1 - lam) p_base."""

    name: str
    decoder: MemoryDecoder
    lam: float
    adapt: bool = False  # λ adapts to the text from `lam` (knnlm.core.mix)

    @property
    def weight(self):
        from knnlm.core.mix import Weight

        return Weight(self.lam, self.adapt)

    def settings(self) -> dict:
        return {"memory": self.name, "memory_lambda": self.lam, **({"memory_lambda_mode": "adaptive"} if self.adapt else {})}


@torch.inference_mode()
def window_target_logprobs(mem: MemoryDecoder, input_ids: torch.Tensor, windows: list, first: int,
                           targets: np.ndarray) -> np.ndarray:
    """log p_mem(target) for the scored columns of a batch of windows, as the LM's are read
    in `score_plan`: windows are (row, first column, end column, _), logits from `first`."""
    from knnlm.core.model import target_logprobs

    _, logits = mem.lm.forward(input_ids, [], logits=True, logits_from=first)  # (B, T - first, V_mem)
    rows = torch.cat([logits[row, c0 - first : c1 - first] for row, c0, c1, _ in windows])  # (m, V_mem)
    t = torch.as_tensor(np.asarray(targets, dtype=np.int64), device=rows.device)
    return target_logprobs(rows, t).cpu().numpy()


def step_logits(mem: MemoryDecoder, ids: torch.Tensor, cache=None, attention_mask=None, position_ids=None,
                every: bool = False):
    """One decoding step of the decoder with its KV cache: (logits at the last position
    (B, V_mem), or at every position (B, t, V_mem) with `every`; the new cache)."""
    from knnlm.core.model import cached_forward

    kw = {} if attention_mask is None else {"attention_mask": attention_mask, "position_ids": position_ids}
    with torch.inference_mode():
        out, cache = cached_forward(mem.lm.model, cache, input_ids=ids.to(mem.lm.device), **kw)
    return (out.logits if every else out.logits[:, -1]), cache
