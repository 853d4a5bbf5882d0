"""The model adapter: the only module that knows transformers.

It loads any HF causal LM (by id, local path, or the built-in default), finds the
key points in its final decoder layer without a per-architecture table, and returns
keys and target log-probabilities for a batch of windows.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch import nn

from knnlm.core.keypoints import DEFAULT_KEY_POINT, KEY_POINTS  # noqa: F401 (re-exported)
from knnlm.errors import KnnlmError

LOG = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


_FFN_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe")


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"]
    for v in kwargs.values():
        if isinstance(v, torch.Tensor):
            return v
    raise RuntimeError("hooked module was called without a tensor input")


def _output_tensor(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks: the one whose length is the config's layer count."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n = getattr(cfg, "num_hidden_layers", None)
    candidates = [m for _, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    for m in candidates:
        if n is not None and len(m) == n:
            return m
    if candidates:  # no layer count in the config: the longest list of blocks
        return max(candidates, key=len)
    raise KnnlmError(f"cannot find the decoder layers of {type(model).__name__}")


@dataclass
class _Site:
    module: nn.Module
    where: str  # "input" or "output"
    path: str  # for messages


def find_key_sites(model: nn.Module) -> dict[str, _Site]:
    """Modules whose input or output is each key point, found by structure, not by a table.

    The FFN block is the last layer's child named like a feed-forward block; models
    without one (OPT keeps fc1/fc2 on the layer) use the layer's first and last direct
    Linear children.  The attention block is the child whose name says attention.
    """
    layers = find_decoder_layers(model)
    last = layers[-1]
    lname = next(n for n, m in model.named_modules() if m is last)
    children = dict(last.named_children())
    sites: dict[str, _Site] = {}
    ffn = next((children[n] for n in _FFN_NAMES if n in children), None)
    if ffn is not None:
        fname = next(n for n in _FFN_NAMES if n in children)
        sites["ffn_input"] = _Site(ffn, "input", f"{lname}.{fname}")
        sites["ffn_output"] = _Site(ffn, "output", f"{lname}.{fname}")
    else:
        linears = [(n, m) for n, m in children.items() if isinstance(m, nn.Linear)]
        if len(linears) >= 2:
            sites["ffn_input"] = _Site(linears[0][1], "input", f"{lname}.{linears[0][0]}")
            sites["ffn_output"] = _Site(linears[-1][1], "output", f"{lname}.{linears[-1][0]}")
    attn = next(
        (
            (n, m)
            for n, m in children.items()
            if ("attn" in n or "attention" in n)
            and "norm" not in n
            and any(True for _ in m.parameters())  # not a dropout or an identity
        ),
        None,
    )
    if attn is not None:
        sites["attn_input"] = _Site(attn[1], "input", f"{lname}.{attn[0]}")
        sites["attn_output"] = _Site(attn[1], "output", f"{lname}.{attn[0]}")
    head = model.get_output_embeddings()
    if head is not None:
        sites["final"] = _Site(head, "input", "output embedding")
    return sites


def _fingerprint_model(model: nn.Module) -> tuple[str, list[float]]:
    """(hash of config and parameter shapes, a sample of the weights).

    The sample is compared with a tolerance (`same_weights`), so one model in float32,
    bfloat16 or float16 is the same model; any other weights are not.
    """
    h = hashlib.sha256()
    cfg = model.config.to_dict()
    for k in ("_name_or_path", "name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash"):
        cfg.pop(k, None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    params = sorted(model.state_dict().items())
    for name, p in params:
        h.update(f"{name}{tuple(p.shape)}".encode())
    sample = []
    step = max(1, len(params) // 8)
    for _, p in params[::step][:8]:  # 16 values from each of 8 tensors spread over the model
        flat = p.detach().reshape(-1)
        idx = (torch.arange(16) * (flat.numel() - 1)) // 15
        sample += [round(float(x), 6) for x in flat[idx].float().cpu()]
    return h.hexdigest()[:16], sample


def same_weights(a: list[float], b: list[float]) -> bool:
    """Weight samples equal up to bfloat16 rounding."""
    return len(a) == len(b) and bool(np.allclose(a, b, rtol=1 / 64, atol=1e-4))


def _fingerprint_tokenizer(tok) -> str:
    h = hashlib.sha256()
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tok.get_vocab().items())).encode())
    h.update(json.dumps(sorted(map(str, tok.all_special_tokens))).encode())
    return h.hexdigest()[:16]


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class LM:
    """A loaded causal LM with its tokenizer and key points."""

    def __init__(self, model: nn.Module, tokenizer, name: str, key_point: str = DEFAULT_KEY_POINT):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.tokenizer.model_max_length = int(1e12)  # we cut windows ourselves
        self.name = name
        self.sites = find_key_sites(model)
        self.key_point = key_point
        self.check_key_point(key_point)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.max_positions = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self._fingerprint: str | None = None
        self._tok_fingerprint: str | None = None
        self._dims: dict[str, int] = {}
        self._accepts_logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters

    # ---- loading ---------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        name_or_path: str = DEFAULT_MODEL,
        dtype: str = "float32",
        device: str = "cpu",
        key_point: str = DEFAULT_KEY_POINT,
    ) -> "LM":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if dtype not in DTYPES:
            raise KnnlmError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        path = name_or_path
        if name_or_path == DEFAULT_MODEL:
            from knnlm.core.assets import ensure_default_model

            path = str(ensure_default_model())
        try:
            tok = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
        except (OSError, ValueError) as e:
            raise KnnlmError(f"cannot load model {name_or_path!r}: {str(e).splitlines()[0]}") from None
        model.to(resolve_device(device))
        return cls(model, tok, name=name_or_path, key_point=key_point)

    def check_key_point(self, key_point: str) -> None:
        if key_point not in KEY_POINTS:
            raise KnnlmError(f"unknown key point {key_point!r}; choose one of {', '.join(KEY_POINTS)}")
        if key_point not in self.sites:
            raise KnnlmError(f"key point {key_point!r} not found in {type(self.model).__name__}")

    # ---- identity --------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """Hash of the architecture (config and parameter shapes)."""
        if self._fingerprint is None:
            self._fingerprint, self._weights_sample = _fingerprint_model(self.model)
        return self._fingerprint

    @property
    def weights_sample(self) -> list[float]:
        self.fingerprint  # noqa: B018 - computes both
        return self._weights_sample

    @property
    def tokenizer_fingerprint(self) -> str:
        if self._tok_fingerprint is None:
            self._tok_fingerprint = _fingerprint_tokenizer(self.tokenizer)
        return self._tok_fingerprint

    def identity(self, key_point: str | None = None) -> dict:
        return {
            "model": self.name,
            "model_fingerprint": self.fingerprint,
            "weights_sample": self.weights_sample,
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
            "key_point": key_point or self.key_point,
        }

    def dim(self, key_point: str | None = None) -> int:
        kp = key_point or self.key_point
        if kp not in self._dims:
            keys, _ = self.forward(torch.zeros(1, 2, dtype=torch.long), [kp], logits=False)
            self._dims[kp] = int(keys[kp].shape[-1])
        return self._dims[kp]

    # ---- tokens ----------------------------------------------------------------------
    @property
    def prefix_token_id(self) -> int | None:
        """The context-only token put before each document (BOS, else EOS)."""
        tok = self.tokenizer
        return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    def encode(self, text: str, prefix: bool = True) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if prefix and self.prefix_token_id is not None:
            ids = [self.prefix_token_id] + ids
        return ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(map(int, ids)))

    # ---- forward ---------------------------------------------------------------------
    @contextlib.contextmanager
    def _capture(self, key_points: list[str]) -> Iterator[dict[str, torch.Tensor]]:
        captured: dict[str, torch.Tensor] = {}
        handles = []
        for kp in key_points:
            self.check_key_point(kp)
            site = self.sites[kp]

            if site.where == "input":

                def pre(mod, args, kwargs, kp=kp):
                    captured[kp] = _first_tensor(args, kwargs)

                handles.append(site.module.register_forward_pre_hook(pre, with_kwargs=True))
            else:

                def post(mod, args, output, kp=kp):
                    captured[kp] = _output_tensor(output)

                handles.append(site.module.register_forward_hook(post))
        try:
            yield captured
        finally:
            for h in handles:
                h.remove()

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        key_points: list[str] | None = None,
        logits: bool = True,
        logits_from: int = 0,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """Keys at each key point, (B, T, d), and logits for positions logits_from..T-1,
        (B, T - logits_from, V), for a batch of windows.

        Right-padding is safe: a causal model's output at a position ignores later ones.
        """
        key_points = key_points if key_points is not None else [self.key_point]
        input_ids = input_ids.to(self.device)
        kwargs = {"use_cache": False, "attention_mask": torch.ones_like(input_ids)}
        keep = 1 if not logits else input_ids.shape[1] - logits_from
        if "final" in key_points or not self._accepts_logits_to_keep:
            keep = 0  # the output projection's input is a key, or the model cannot skip positions
        if keep:
            kwargs["logits_to_keep"] = keep  # skip the output projection where nothing is scored
        with self._capture(key_points) as captured:
            out = self.model(input_ids=input_ids, **kwargs)
        b, t = input_ids.shape
        keys = {kp: captured[kp].reshape(b, t, -1) for kp in key_points}  # (B, T, d); OPT flattens
        if not logits:
            return keys, None
        return keys, out.logits[:, out.logits.shape[1] - (t - logits_from) :]  # (B, T - logits_from, V)


def cached_forward(model: nn.Module, cache=None, **inputs):
    """One forward pass of an HF causal LM with its KV cache: (outputs, the new cache).
    transformers 5 names the cache `cache` (in and out); older releases `past_key_values`."""
    new = "cache" in inspect.signature(model.forward).parameters
    out = model(**inputs, **({"cache": cache} if new else {"past_key_values": cache}), use_cache=True)
    return out, (out.cache if new else out.past_key_values)


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor, chunk: int = 2048, with_max: bool = False):
    """log p(target) from logits (N, V) and targets (N,), in float32, chunked over N; with
    `with_max` also the log max p of each row (N,) (the LM's confidence: its most likely
    token's log-probability)."""
    out = torch.empty(targets.shape[0], dtype=torch.float32, device=logits.device)
    top = torch.empty_like(out) if with_max else None
    for i in range(0, targets.shape[0], chunk):
        lg = logits[i : i + chunk].float()  # (n, V)
        lse = torch.logsumexp(lg, dim=1)
        out[i : i + chunk] = lg.gather(1, targets[i : i + chunk, None]).squeeze(1) - lse
        if with_max:
            top[i : i + chunk] = lg.max(dim=1).values - lse
    return (out, top) if with_max else out


def to_numpy(t: torch.Tensor, dtype=np.float32) -> np.ndarray:
    return t.detach().float().cpu().numpy().astype(dtype, copy=False)
