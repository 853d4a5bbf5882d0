"""Generation speed with fewer searches: one stream on the CPU, k = 1024, the
WikiText-2 datastore (238k entries) searched with IVF-PQ + re-ranking and with an exact
Flat index (or, with --flat-chars, a smaller exact datastore), each with RetoMaton pointers
off and on (and adaptive retrieval), against the base LM; plus the prompts stepped together
as one batch, pointers off and on.

    python benchmarks/bench_generate_fewer.py --datastore /work/cache/wikitext2/ds-bfloat16 --flat-chars 190000 \
        --only 5,6,10,11 --pointers 16      # a 45,879-entry exact Flat datastore from wiki.valid.raw

    python benchmarks/bench_generate_fewer.py --datastore /work/cache/wikitext2/ds-bfloat16 --pointers 16
    python benchmarks/bench_generate_fewer.py          # the datastore bench_wikitext.py builds in benchmarks/cache

Each setting generates `--tokens` greedy tokens (EOS ignored) from bench_generate's 8
prompts; settings are interleaved and repeated, the median tokens/s is reported with its
ratio to the base LM measured in the same run.  Searches per token count the queries the
index answered.  Results: benchmarks/results/generate-fewer.md.
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from knnlm.core.datastore import Datastore
from knnlm.core.model import LM
from knnlm.retrieval.adaptive import Adaptive
from knnlm.retrieval.pointers import Pointers
from knnlm.run.generate import KNNLM

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_generate import PROMPTS  # noqa: E402
from common import PLACEHOLDERS, add_data_arg, check_wikitext, command_line  # noqa: E402

LOG = logging.getLogger("bench")


def counting(searcher) -> list[int]:
    """Count the queries a searcher answers (wraps its search)."""
    calls: list[int] = []
    plain = searcher.search

    def search(q, k, *a, **kw):
        calls.append(len(q))
        return plain(q, k, *a, **kw)

    searcher.search = search
    return calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datastore", default=str(HERE / "cache" / "wikitext2" / "ds-bfloat16"))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("-k", type=int, default=1024)
    ap.add_argument("--lambda", dest="lam", type=float, default=0.05, help="the datastore's tuned λ")
    ap.add_argument("--temperature", type=float, default=4.0, help="the datastore's tuned T")
    ap.add_argument("--pointers", type=int, default=16, help="pointer threshold of the 'pointers on' settings")
    ap.add_argument("--adaptive", type=float, default=0.5, help="max-prob threshold of the adaptive setting")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--output", default=str(HERE / "results" / "generate-fewer.md"))
    ap.add_argument("--flat-chars", type=int, default=None,
                    help="instead of the Flat index of --datastore, an exact Flat datastore built from the first N "
                         "characters of wiki.valid.raw (cached in benchmarks/cache/generate)")
    ap.add_argument("--only", default=None, help="comma-separated setting numbers to run (1-based; 1 = base LM)")
    add_data_arg(ap)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="bench: %(message)s", stream=sys.stderr)
    torch.manual_seed(0)
    valid = check_wikitext(args.data, ["wiki.valid.raw"]) / "wiki.valid.raw" if args.flat_chars else None
    ds = Datastore(args.datastore)
    lm = LM.load(args.model, dtype=args.dtype, device="cpu", key_point=ds.key_point)
    knn = KNNLM(lm, lam=args.lam, k=args.k, knn_temperature=args.temperature)
    knn.add_datastore("ivfpq", ds.path, index="ivf2048-pq64")
    flat = ds
    if args.flat_chars:
        from bench_generate import datastore as small_datastore

        cache = HERE / "cache" / "generate"
        cache.mkdir(parents=True, exist_ok=True)
        flat = small_datastore(lm, cache, args.flat_chars, valid)  # window 512 / stride 256, Flat index
    knn.add_datastore("flat", flat.path, index="flat")
    calls = {name: counting(s) for name, s in knn.searchers.items()}
    n, ptr, ada = args.tokens, Pointers(args.pointers), Adaptive("max_prob", args.adaptive)

    def each(**kw):
        return lambda: [knn.generate(p, n, ignore_eos=True, **kw).ids for p in PROMPTS]

    def batched(**kw):
        return lambda: [g.ids for g in knn.generate_many(PROMPTS, n, max_batch=len(PROMPTS), ignore_eos=True, **kw)]

    settings = {
        "base LM": ("", each(datastore=None)),
        "kNN-LM, IVF-PQ + re-rank": ("ivfpq", each(datastore="ivfpq", pointers=None)),
        f"kNN-LM, IVF-PQ + re-rank, pointers (threshold {args.pointers})": ("ivfpq",
                                                                            each(datastore="ivfpq", pointers=ptr)),
        f"kNN-LM, IVF-PQ + re-rank, adaptive (max p >= {args.adaptive})": ("ivfpq",
                                                                           each(datastore="ivfpq", adaptive=ada)),
        f"kNN-LM, exact Flat ({flat.count} entries)": ("flat", each(datastore="flat", pointers=None)),
        f"kNN-LM, exact Flat, pointers (threshold {args.pointers})": ("flat", each(datastore="flat", pointers=ptr)),
        f"base LM, {len(PROMPTS)} prompts as one batch": ("", batched(datastore=None)),
        f"kNN-LM IVF-PQ, {len(PROMPTS)} prompts as one batch": ("ivfpq", batched(datastore="ivfpq", pointers=None)),
        f"kNN-LM IVF-PQ, {len(PROMPTS)} prompts as one batch, pointers": ("ivfpq",
                                                                          batched(datastore="ivfpq", pointers=ptr)),
        f"kNN-LM exact Flat, {len(PROMPTS)} prompts as one batch": ("flat", batched(datastore="flat", pointers=None)),
        f"kNN-LM exact Flat, {len(PROMPTS)} prompts as one batch, pointers": ("flat",
                                                                              batched(datastore="flat", pointers=ptr)),
    }
    all_names = list(settings)
    if args.only:
        keep = {names_i - 1 for names_i in map(int, args.only.split(","))}
        settings = {name: v for j, (name, v) in enumerate(settings.items()) if j in keep or j in (0, 6)}
    for p in PROMPTS[:1]:  # warm-up: allocator, faiss threads, tokenizer caches
        for name in (None, "ivfpq", "flat"):
            knn.generate(p, 4, datastore=name, ignore_eos=True)
    seconds = {name: [] for name in settings}
    searches = {name: 0 for name in settings}
    outputs = {}
    for rep in range(args.repeats):
        for name, (store, fn) in settings.items():  # interleaved: machine noise hits every setting alike
            before = sum(calls[store]) if store else 0
            t = time.perf_counter()
            outputs[name] = fn()
            seconds[name].append(time.perf_counter() - t)
            searches[name] = (sum(calls[store]) - before) if store else 0
        LOG.info("repeat %d/%d done", rep + 1, args.repeats)
    total = n * len(PROMPTS)
    names, a = list(settings), all_names
    base = {False: statistics.median(seconds[a[0]]), True: statistics.median(seconds[a[6]])}
    rows = ["| setting | tokens/s | ratio to base LM | searches per token | same tokens as pointers off |",
            "|---|---:|---:|---:|---|"]
    plain_of = {a[2]: a[1], a[3]: a[1], a[5]: a[4], a[8]: a[7], a[10]: a[9]}
    for name in names:
        med = statistics.median(seconds[name])
        ref = base["prompts as one batch" in name]
        same = ""
        if name in plain_of and plain_of[name] in outputs:
            same = f"{sum(x == y for x, y in zip(outputs[name], outputs[plain_of[name]]))}/{len(PROMPTS)} prompts"
        rows.append(f"| {name} | {total / med:.1f} | {ref / med:.2f} | "
                    f"{searches[name] / total:.2f} | {same} |")
    env = (f"model {args.model} ({args.dtype}, cpu); datastore {ds.path.name}: {ds.count} entries, d={ds.dim}; "
           f"k={args.k}, λ={args.lam}, T={args.temperature}; {len(PROMPTS)} prompts x {n} greedy tokens (EOS "
           f"ignored), median of {args.repeats} interleaved repeats; torch {torch.__version__}, "
           f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads. Batched rows are "
           "compared with the batched base LM.")
    table = "\n".join(rows)
    print(env)
    print(table)
    cmd = command_line(__file__)
    Path(args.output).write_text(
        "# Generation speed with fewer searches: pointers and adaptive retrieval (CPU, one stream)\n\n"
        f"Command: `{cmd}`\n({PLACEHOLDERS}.)\n\n{env}\n\n{table}\n\n"
        "Targets: >= 0.95x the base LM with the IVF-PQ datastore, >= 0.9x with an exact Flat "
        "datastore of >= 40k entries (CPU; GPU not measured here).\n",
        encoding="utf-8")
    LOG.info("wrote %s", args.output)


if __name__ == "__main__":
    from common import run_main  # benchmarks/common.py: a failure ends in one `error:` line

    run_main(main)
