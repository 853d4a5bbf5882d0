"""What every benchmark script shares: the data folder and its checksums, logging without
loader chatter, and an end in one `error:` line (like the `knnlm` command), never a traceback.

    from common import add_data_arg, check_wikitext, run_main, setup_logging
    ...
    if __name__ == "__main__":
        run_main(main)
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Callable

from knnlm.core.corpus import file_sha256
from knnlm.errors import KnnlmError

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data"  # ../shared/data beside the clone

# WikiText-2 raw (wikitext-2-raw-v1, CC BY-SA 3.0): the files of the original archive
# (wikitext-2-raw-v1.zip, sha256 ef7edb56...5a11), unchanged.  name -> (bytes, sha256)
WIKITEXT2 = {
    "wiki.valid.raw": (1_146_846, "4cd0f6876d07a413aa911261ff6d363c72d757d47f0fdd6015702014c89cb9c7"),
    "wiki.test.raw": (1_290_590, "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"),
}
WIKITEXT2_DIR = "wikitext-2-raw"


# a results page records paths as placeholders, not as they were on the machine that ran it
PLACEHOLDERS = ("Paths: CACHE stands for the folder of the shared datastores and caches (CACHE/wikitext2: "
                "bench_wikitext.py's WikiText-2 datastore, query caches and texts; CACHE/demo: the folders `knnlm demo` "
                "makes), WORK for a scratch folder of the run")
_PLACES = (  # (pattern, replacement), in order
    (r"(?<![\w.])/\S*/\.venv/bin/python[\d.]*", "python"),  # a machine's venv, not a checkout's .venv/
    (r"\bflock [^\s`]+ (?=\S)", ""),  # the lock a run held on a shared machine
    (r"/work/(?:main|wt-[\w.-]+)/", ""),  # a checkout: paths relative to its root
    (r"/work/shared/data\b", "../shared/data"),
    (r"/work/cache/", "CACHE/"),
    (r"/work/cache\b", "CACHE"),
    (r"/(?:work|tmp)/", "WORK/"),
)


def placeholders(text: str) -> str:
    """`text` with this machine's folders written as the placeholders of PLACEHOLDERS."""
    for pattern, replacement in _PLACES:
        text = re.sub(pattern, replacement, text)
    return text


class BenchError(Exception):
    """A benchmark cannot run as asked; the message says what to do."""


def add_data_arg(ap) -> None:
    ap.add_argument("--data", default=str(DEFAULT_DATA),
                    help=f"data folder holding {WIKITEXT2_DIR}/ with wiki.valid.raw and wiki.test.raw "
                         "(their sha256 are checked; see benchmarks/README.md) (default: ../shared/data)")


def check_wikitext(data: str | Path, names=tuple(WIKITEXT2)) -> Path:
    """The folder of the WikiText-2 raw files (`data`/wikitext-2-raw, or `data` itself if it
    holds them), each present and with its known sha256; checked before any long work."""
    data = Path(data)
    folder = data if (data / names[0]).is_file() else data / WIKITEXT2_DIR
    for name in names:
        size, digest = WIKITEXT2[name]
        f = folder / name
        if not f.is_file():
            raise BenchError(f"{f} not found: this benchmark needs WikiText-2 raw ({', '.join(names)}; "
                             f"{name}: {size} bytes, sha256 {digest}); give their folder with --data "
                             "(see benchmarks/README.md)")
        got = file_sha256(f)
        if got != digest:
            raise BenchError(f"{f} has sha256 {got}, not WikiText-2 raw's {digest}: another or a changed file")
    return folder


def data_note(names=tuple(WIKITEXT2)) -> str:
    """One line for a results page: the data files a run read, with their sha256."""
    return "Data: WikiText-2 raw (CC BY-SA 3.0), " + ", ".join(
        f"`{WIKITEXT2_DIR}/{n}` (sha256 `{WIKITEXT2[n][1]}`)" for n in names) + "."


def setup_logging(*names: str, fmt: str = "%(asctime)s %(message)s") -> None:
    """INFO from the benchmark's loggers and knnlm, WARNING and up from every other library
    (faiss logs eight INFO lines about its AVX512 build on import)."""
    logging.basicConfig(level=logging.WARNING, format=fmt, stream=sys.stderr)
    for name in ("knnlm", *names):
        logging.getLogger(name).setLevel(logging.INFO)
    from transformers.utils import logging as hf_logging  # every benchmark loads a model with it

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # "Loading weights" bars


def run_main(main: Callable[[], None]) -> None:
    """Run a benchmark's main and exit: a failure ends in one `error: ...` line and status 1
    (130 when interrupted); KNNLM_DEBUG=1 shows the traceback of an unexpected one."""
    try:
        main()
    except (KnnlmError, BenchError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # a bug or an environment problem: one line, the traceback on request
        if os.environ.get("KNNLM_DEBUG"):
            raise
        text = " ".join(str(e).split())[:300]
        print(f"error: {type(e).__name__}{': ' + text if text else ''} (KNNLM_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        sys.exit(1)


def query_cache(get_lm: Callable, text: Path, out: Path, batch_tokens: int = 4096, confidence: bool = False,
                cache: bool = False) -> dict:
    """Per scored position of `text` (windows 1024/512): the query key (fp16), log p_LM(target),
    the target, and each document's first position (doc_first); with `confidence` also the
    LM's log max p there (lm_max); with `cache` also the final hidden states of the same pass
    (final, fp16: the continuous cache's keys; `cache_logprobs` gives log p_cache(target) at
    any θ and size from them).  A cache written without what is asked is computed again.  Computed once with the LM that get_lm() returns (called only then), saved to `out`
    (.npz), then read from there."""
    import numpy as np

    if out.exists():
        z = np.load(out)
        if (not confidence or "lm_max" in z.files) and (not cache or "final" in z.files):
            return {name: z[name] for name in z.files}
    import torch

    from knnlm.core.batching import plan_files
    from knnlm.core.model import target_logprobs
    from knnlm.run.continuous import CACHE_KEY_POINT

    lm = get_lm()
    plan = plan_files(lm, [text], 1024, 512, batch_tokens)
    targets = plan.targets().astype(np.int64)
    keys = np.empty((plan.count, lm.dim()), np.float16)  # (n, d)
    lp, top = np.empty(plan.count, np.float32), np.empty(plan.count, np.float32)  # (n,) each
    read = [lm.key_point] + ([CACHE_KEY_POINT] if cache and lm.key_point != CACHE_KEY_POINT else [])
    final = np.empty((plan.count, lm.dim(CACHE_KEY_POINT)), np.float16) if cache else None
    for b in range(len(plan.batches)):
        windows = list(plan.scored(b))
        first = min(c0 for _, c0, _, _ in windows)
        feats, logits = lm.forward(plan.batch_input(b), read, logits=True, logits_from=first)
        for row, c0, c1, t in windows:
            keys[t : t + c1 - c0] = feats[lm.key_point][row, c0:c1].float().numpy()
            if cache:
                final[t : t + c1 - c0] = feats[CACHE_KEY_POINT][row, c0:c1].float().numpy()
            lp[t : t + c1 - c0], top[t : t + c1 - c0] = (x.numpy() for x in target_logprobs(
                logits[row, c0 - first : c1 - first], torch.from_numpy(targets[t : t + c1 - c0]), with_max=True))
    extra = {"final": final} if cache else {}
    tmp = out.with_name(out.stem + ".tmp.npz")
    np.savez(tmp, keys=keys, lm=lp, targets=targets, doc_first=plan.docs[:, 2], lm_max=top, **extra)
    os.replace(tmp, out)
    z = np.load(out)
    return {name: z[name] for name in z.files}


def cache_logprobs(q: dict, settings: dict | None = None) -> tuple:
    """log p_cache(target) (n,) of a query cache made with `cache` (its final hidden states),
    NaN at a document's first position, at the θ and size a datastore recorded in `settings`
    (else the defaults: knnlm.core.settings.cache_params), and that (θ, size)."""
    from knnlm.core.scoring import cache_target_logprobs
    from knnlm.core.settings import cache_params

    theta, size = cache_params({"settings": settings} if settings else None)
    return cache_target_logprobs(q["final"], q["targets"], q["doc_first"], theta, size), theta, size


def retrieve(searcher, keys, k: int, chunk: int = 4096):
    """Every query's k nearest entries through `searcher` (its index, nprobe and re-ranking):
    distances and values (n, k), and the search's seconds."""
    import time

    import numpy as np

    n = len(keys)
    dists, vals = np.empty((n, k), np.float32), np.empty((n, k), np.int32)
    t0 = time.perf_counter()
    for i in range(0, n, chunk):
        d, ids = searcher.search(np.asarray(keys[i : i + chunk], np.float32), k)
        dists[i : i + chunk], vals[i : i + chunk] = d, searcher.ds.vals[np.maximum(ids, 0)]
    return dists, vals, time.perf_counter() - t0


def default_logprobs(lm_logprobs, dists, vals, targets, settings: dict, lm_max=None, cache=None, ends=None):
    """log p(target) of a text as `knnlm eval` mixes it by default with a datastore's recorded
    settings: k and T as recorded, each position's base λ from its nearest distance (the
    λ-by-distance table when recorded; one tuned with the LM's confidence reads `lm_max`, the
    LM's log max p at each position), then, where the datastore recorded a cache λ above 0,
    the continuous cache (`cache`: log p_cache(target), NaN where empty) with that λ, all
    adapting over the text; and the datastore's λ at the end (`ends`, a list, gets each memory's)."""
    import numpy as np

    from knnlm.core.mix import Weight, mix_text
    from knnlm.core.neighbor import DistanceLambda
    from knnlm.core.scoring import knn_target_logprobs

    k = min(int(settings["k"]), dists.shape[1])
    knn = knn_target_logprobs(dists[:, :k], vals[:, :k], targets, settings["temperature"])
    mems, weights = [knn], [Weight(settings["lambda"], adapt=True)]
    cache_lam = settings.get("cache_lambda") or 0.0
    if cache is not None and cache_lam > 0:
        mems.append(np.asarray(cache, np.float64))
        weights.append(Weight(float(cache_lam), adapt=True))
    table = DistanceLambda.from_dict(settings.get("lambda_by_distance"))
    base = None
    if table is not None:
        base = np.stack([table(dists[:, 0], lm_max)] + [np.full(len(knn), w.lam) for w in weights[1:]], axis=1)
    lp, _, lams = mix_text(np.asarray(lm_logprobs, np.float64), np.stack(mems, axis=1), weights, base)
    if ends is not None:
        ends.extend(float(x) for x in lams)
    return lp, float(lams[0])


def command_line(script: str | Path, named: dict | None = None, argv: list[str] | None = None) -> str:
    """This run's command for a results page: `python benchmarks/SCRIPT ARGS...` (`script`: a
    name under benchmarks/ or a path, e.g. __file__), each value of `named` (a path given on
    the command line) written as its name, e.g. {"DATASTORE": "/data/ds"} turns `--datastore
    /data/ds/` into `--datastore DATASTORE/`, and the machine's other folders as PLACEHOLDERS."""
    path = Path(script)
    name = path.resolve().relative_to(ROOT).as_posix() if path.is_absolute() else f"benchmarks/{script}"
    line = " ".join(["python", name, *(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))])
    for key, value in sorted((named or {}).items(), key=lambda kv: -len(str(kv[1] or ""))):
        if value:
            line = line.replace(str(value).rstrip("/"), key)
    return placeholders(line)


def write_results(res: dict, out: str | Path, render: Callable[[dict, str], str], command: str) -> str:
    """The results' tail every benchmark shares: `command` recorded in `res`, `res` written to
    OUT.json and render(res, command) to OUT.md (each whole or not at all), the page printed."""
    import json

    res["command"] = command
    page = render(res, command)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, text in ((out.with_suffix(".json"), json.dumps(res, indent=2, sort_keys=True) + "\n"),
                       (out.with_suffix(".md"), page)):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    print(page)
    return page
