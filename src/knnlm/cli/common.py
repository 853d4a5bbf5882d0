"""Pieces every `knnlm` subcommand shares: argument groups, model loading, output helpers."""

from __future__ import annotations

import argparse
import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from knnlm.errors import KnnlmError

LOG = logging.getLogger("knnlm")


class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # "(default: X)" only where it says something
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def add_model_args(p: argparse.ArgumentParser, with_key_point: bool = False) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="HF model id or local path; 'smollm2-135m' is the built-in default "
                        "(default: the datastore's model, else a --memory decoder's base model, else smollm2-135m)")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="model weights dtype (default: the datastore's, else bfloat16)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... or auto")
    if with_key_point:
        from knnlm.core.keypoints import DEFAULT_KEY_POINT, KEY_POINTS

        g.add_argument("--key-point", choices=list(KEY_POINTS), default=DEFAULT_KEY_POINT,
                       help="where in the final layer the key is read")


def add_window_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("windows")
    g.add_argument("--window", type=int, default=1024, help="tokens per model input (W)")
    g.add_argument("--stride", type=int, default=512, help="new tokens scored per window (S)")
    g.add_argument("--batch-tokens", type=int, default=4096, help="padded tokens per forward pass")


def cache_lambda_arg(text: str) -> float | str:
    """--cache-lambda: a number, or "auto"."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


def add_cache_args(g, whose: str, tuned_by: str) -> None:
    """--cache-lambda, --cache-theta, --cache-size on the argument group `g` (`whose`: whose
    earlier positions the cache holds; `tuned_by`: which datastore's tuned values are the default)."""
    g.add_argument("--cache-lambda", type=cache_lambda_arg, default=None, metavar="LAMBDA|auto",
                   help=f"weight of the continuous cache ({whose} own earlier positions) mixed after the datastore "
                        f"(the LM without one; default: the lambda {tuned_by} tuned for it, adapting to the text; none "
                        "where that is 0 or not recorded); 'auto': that lambda, else 0.05, adapting; 0: no cache")
    g.add_argument("--cache-theta", type=float, default=None,
                   help=f"scale of the dot product of final hidden states (default: {tuned_by}'s tuned theta, "
                        "else 0.05)")
    g.add_argument("--cache-size", type=int, default=None,
                   help=f"most recent positions in the cache (default: {tuned_by}'s tuned size, else 8192)")


def add_knn_args(p: argparse.ArgumentParser, lam: bool = True, cache: bool = False) -> None:
    g = p.add_argument_group("retrieval (k, lambda and T default to the datastore's tuned settings; see `knnlm info`)")
    g.add_argument("--datastore", "-d", help="datastore directory (from `knnlm build`)")
    g.add_argument("--index", default=None,
                   help="index name inside the datastore (default: its only index); 'torch': exact search, "
                        "re-ranking and p_kNN in torch on the model's device (keys must fit there)")
    if lam:
        g.add_argument("-k", "--k", type=int, default=None,
                       help="neighbours retrieved (default: the datastore's tuned k, else 1024)")
        g.add_argument("--lambda", dest="lam", type=float, default=None,
                       help="weight of p_kNN in the interpolation (default: the datastore's tuned lambda, else 0.25)")
        g.add_argument("--temperature", type=float, default=None,
                       help="kNN softmax temperature (default: the datastore's tuned T, else 1)")
        g.add_argument("--paper-defaults", action="store_true",
                       help="use the paper's k=1024, lambda=0.25, T=1 instead of the datastore's tuned settings")
        g.add_argument("--lambda-mode", choices=["adaptive", "fixed"], default=None,
                       help="adaptive: lambda starts at its setting and follows the text being scored (a datastore "
                            "that does not fit the text falls back to the LM, generation adapts to the prompt and "
                            "its own tokens); fixed: as set (default: adaptive, fixed when --lambda or "
                            "--paper-defaults is given)")
        g.add_argument("--no-lambda-by-distance", dest="lambda_by_distance", action="store_false", default=None,
                       help="one lambda for every position, not the datastore's lambda per nearest-neighbour "
                            "distance (used by default when the datastore recorded one and --lambda is not given)")
    else:
        g.add_argument("-k", "--k", type=int, default=None,
                       help="neighbours retrieved (default: 1024, or the datastore's size if smaller)")
    g.add_argument("--nprobe", type=int, default=None, help="IVF lists probed (default: the index's)")
    g.add_argument("--no-rerank", action="store_true", help="keep approximate (PQ) distances")
    g.add_argument("--search-actors", type=int, default=0,
                   help="sharded datastore: search it with this many Ray actors (0: in this process)")
    g.add_argument("--ray-address", default=None,
                   help="join this Ray cluster (default: start a local Ray when Ray is used)")
    if cache:
        c = p.add_argument_group("continuous cache (Grave et al. 2017): the document's own earlier positions")
        add_cache_args(c, "the document's", "the datastore")


def add_fewer_searches_args(p: argparse.ArgumentParser) -> None:
    """RetoMaton pointers and adaptive retrieval (knnlm.retrieval): fewer searches per token."""
    g = p.add_argument_group("fewer searches (off unless given)")
    g.add_argument("--pointers", type=int, default=None, metavar="THRESHOLD",
                   help="RetoMaton: follow the last step's neighbours whose value was the token produced to their "
                        "next entries; search only when fewer than THRESHOLD remain")
    g.add_argument("--pointer-every", type=int, default=0, metavar="N",
                   help="with --pointers, search at least once every N tokens (0: only for want of pointers)")
    g.add_argument("--adaptive", type=float, default=None, metavar="THRESHOLD",
                   help="adaptive retrieval: skip the search where the LM is confident (max p_LM >= THRESHOLD, or "
                        "entropy <= THRESHOLD nats with --adaptive-signal entropy); p_LM alone there")
    g.add_argument("--adaptive-signal", choices=["max_prob", "entropy"], default="max_prob",
                   help="the LM's confidence measure for --adaptive")


def fewer_searches(args) -> dict:
    """pointers= and adaptive= keyword arguments from add_fewer_searches_args' options."""
    from knnlm.retrieval.adaptive import Adaptive
    from knnlm.retrieval.pointers import Pointers

    if args.pointers is None and args.pointer_every:
        raise KnnlmError("--pointer-every needs --pointers THRESHOLD")
    return {"pointers": Pointers(args.pointers, args.pointer_every) if args.pointers is not None else None,
            "adaptive": Adaptive(args.adaptive_signal, args.adaptive) if args.adaptive is not None else None}


def settings_from_args(args) -> dict:
    """The settings groups (knnlm.run.options) the retrieval, mixing, window and cache
    options of a command name: retrieval=, mixing=, windows=, cache= keyword arguments."""
    from knnlm.run.options import CacheSettings, MixSettings, RetrievalSettings, WindowSettings

    fewer = fewer_searches(args)
    return {
        "retrieval": RetrievalSettings(k=args.k, temperature=args.temperature, index=args.index, nprobe=args.nprobe,
                                       rerank=False if args.no_rerank else None, **fewer,
                                       actors=getattr(args, "search_actors", 0),
                                       ray_address=getattr(args, "ray_address", None),
                                       paper_defaults=args.paper_defaults),
        "mixing": MixSettings(lam=args.lam, mode=args.lambda_mode, by_distance=getattr(args, "lambda_by_distance", None),
                              cache_lambda=getattr(args, "cache_lambda", None),
                              memory_lambda=getattr(args, "memory_lambda", None)),
        "windows": WindowSettings(args.window, args.stride, args.batch_tokens),
        "cache": CacheSettings(**{f: getattr(args, a) for f, a in (("theta", "cache_theta"), ("size", "cache_size"))
                                  if hasattr(args, a)}),
    }


def searcher_from_args(args, ds):
    """The searcher the retrieval options name (a sharded datastore: in process or on Ray actors)."""
    from knnlm.scale import open_searcher

    actors = getattr(args, "search_actors", 0)
    return open_searcher(ds, args.index, nprobe=args.nprobe, rerank=False if args.no_rerank else None,
                         backend="ray" if actors else "local", actors=actors or None,
                         ray_address=getattr(args, "ray_address", None))


def load_lm(args, datastore: str | None = None, key_point: str | None = None, memory: str | None = None):
    """The LM of a command: --model, else the datastore's model, else the memory decoder's
    base model (a decoder used without a datastore), else the default model."""
    from knnlm.core.model import DEFAULT_MODEL, LM
    from knnlm.scale import open_datastore

    meta = open_datastore(datastore).meta if datastore else {}
    if memory and not meta:
        from knnlm.memory.decoder import read_meta

        meta = {"identity": {"model": read_meta(memory).get("base_model")}}
    model = args.model or meta.get("identity", {}).get("model") or DEFAULT_MODEL
    dtype = args.dtype or meta.get("model_dtype") or "bfloat16"
    kp = key_point or meta.get("key_point") or "ffn_input"
    quiet_transformers()
    LOG.info("loading %s (%s)", model, dtype)
    return LM.load(model, dtype=dtype, device=args.device, key_point=kp)


def quiet_transformers() -> None:
    """transformers' own warnings and progress bars off (imports it: call it just before a model loads)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def print_tuned(t: dict) -> None:
    """The line `knnlm build` ends with: the settings self-tuning recorded."""
    print(f"tuned on {t['tokens']} positions of its own corpus (leave-own-document-out): k={t['k']} "
          f"lambda={t['lambda']} T={t['temperature']} (ppl {t['ppl_lm']:.3f} -> {t['ppl_knnlm']:.3f}); "
          "commands default to these")


def write_json(path: str | Path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)


def numbers(text: str | None, kind, option: str) -> list | None:
    """A comma-separated list of numbers from the command line (None if not given)."""
    if not text:
        return None
    try:
        return [kind(x) for x in text.split(",")]
    except ValueError:
        raise KnnlmError(f"{option} takes comma-separated {kind.__name__}s, got {text!r}") from None


def table(rows: list[tuple[str, str]]) -> str:
    w = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{w}}  {b}" for a, b in rows)


def subcommand_adder(sub):
    """`add(name, fn, help, epilog)` for an argparse subparsers object: a subcommand whose help is
    its description, whose epilog lists runnable examples, and which takes -q/--quiet too."""

    def add(name, fn, help, epilog):
        sp = sub.add_parser(name, help=help, description=help, epilog="examples:\n" + epilog,
                            formatter_class=Formatter)
        sp.set_defaults(fn=fn)
        sp.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress bars or info messages")
        return sp

    return add


def finishing_mark(output: str | Path) -> Path:
    return Path(output).with_name(Path(output).name + ".unfinished")


@contextmanager
def finishing(output: str | Path, overwrite: bool) -> Iterator[bool]:
    """For a command that publishes `output` and then adds to it (an index, tuned
    settings): a marker `<output>.unfinished` lives from the start until its last step.
    Yields True when an earlier run published `output` and was stopped (killed) before
    that: the caller then does only the steps after publishing.  An `output` that exists
    without the marker is refused unless `overwrite`."""
    out, mark = Path(output), finishing_mark(output)
    resume = out.exists() and mark.exists() and not overwrite
    if out.exists() and not overwrite and not resume:
        raise KnnlmError(f"{output} already exists (use --overwrite to replace it)")
    if resume:
        LOG.warning("finishing %s: an earlier run published it but stopped before its last steps", out)
    mark.touch()
    yield resume
    mark.unlink(missing_ok=True)
