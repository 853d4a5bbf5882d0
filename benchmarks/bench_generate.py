"""Generation speed of the kNN-LM against the base LM, on the default model.

A small datastore is built from the first ~20k characters of WikiText-2's validation
split (wiki.valid.raw in --data, default ../shared/data/wikitext-2-raw, checked by sha256:
benchmarks/README.md; cached in benchmarks/cache/generate/, git-ignored).  Each setting generates
`--tokens` tokens greedily (EOS ignored) from the same prompts; settings are interleaved
and repeated, and the median tokens/s is reported, with the ratio to the base LM.

    python benchmarks/bench_generate.py                      # ~8 min on 2 CPU cores
    python benchmarks/bench_generate.py --device cuda --dtype bfloat16

Settings: KNNLM without a datastore (base LM, KV cache); KNNLM with the datastore (one
forward step + one search per token); transformers' own `generate` with and without the
KNNLogitsProcessor; a loop that re-runs the whole prefix for every token (no KV
cache), which is what the KV cache saves; and all prompts stepped together as one batch
(`KNNLM.generate_many`, what `knnlm serve` does with concurrent requests).
Results: benchmarks/results/generate.md.
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
from common import add_data_arg, check_wikitext, data_note, run_main, setup_logging

from knnlm.core.datastore import Datastore, build_datastore
from knnlm.core.index import build_index, list_indexes
from knnlm.core.model import LM
from knnlm.run.generate import KNNLM

HERE = Path(__file__).resolve().parent
LOG = logging.getLogger("bench")
PROMPTS = [
    " = Homarus gammarus = \n\n Homarus gammarus , known as the European lobster or common lobster , is a",
    "The history of the city begins in",
    "In 1998 , the band released",
    "The species was first described by",
    " = = Early life = = \n\n He was born in",
    "The game received generally positive reviews from critics , who",
    "During the Second World War , the ship",
    "The river flows through",
]


def datastore(lm: LM, cache: Path, chars: int, valid: Path) -> Datastore:
    """The first `chars` characters of wiki.valid.raw (`valid`, cut at a line end) as a datastore."""
    text = valid.read_text(encoding="utf-8")[:chars]
    text = text[: text.rfind("\n") + 1]
    corpus = cache / f"wiki_valid_{chars}.txt"
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in lm.name.strip("/").split("/")[-1])
    out = cache / f"ds-valid-{chars}-{slug}-{lm.dtype}".replace("torch.", "")  # one per model and dtype
    if not corpus.exists() or corpus.read_text(encoding="utf-8") != text:
        corpus.write_text(text, encoding="utf-8")
    if not (out / "meta.json").exists():
        window = min(512, lm.max_positions or 512)
        build_datastore(lm, [corpus], out, window=window, stride=window // 2, overwrite=True, progress=False)
    ds = Datastore(out)
    if "flat" not in list_indexes(ds):
        build_index(ds, "Flat", progress=False)
    return ds


def no_cache_generate(lm: LM, prompt: str, n: int) -> list[int]:
    """Greedy decoding that re-runs the whole prefix for every new token."""
    ids = lm.encode(prompt)
    for _ in range(n):
        _, logits = lm.forward(torch.tensor([ids]), [], logits=True, logits_from=len(ids) - 1)  # (1, 1, V)
        ids.append(int(logits[0, -1].argmax()))
    return ids[-n:]


def hf_generate(lm: LM, prompt: str, n: int, processors=None) -> list[int]:
    x = torch.tensor([lm.encode(prompt)], device=lm.device)
    out = lm.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                            logits_processor=processors, eos_token_id=None,  # go on after EOS, as ignore_eos
                            pad_token_id=lm.tokenizer.eos_token_id)
    return out[0, x.shape[1]:].tolist()


def add_setup_args(ap: argparse.ArgumentParser) -> None:
    """The model and datastore options shared with bench_serve.py."""
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--chars", type=int, default=20_000, help="characters of wiki.valid.raw in the datastore")
    ap.add_argument("-k", type=int, default=1024)
    ap.add_argument("--lambda", dest="lam", type=float, default=0.25)
    add_data_arg(ap)


def setup(args) -> tuple[LM, Datastore, KNNLM]:
    """The model, the cached datastore (named "wiki" in the KNNLM) and the KNNLM over them."""
    valid = check_wikitext(args.data, ["wiki.valid.raw"]) / "wiki.valid.raw"  # before the model loads
    cache = HERE / "cache" / "generate"
    cache.mkdir(parents=True, exist_ok=True)
    lm = LM.load(args.model, dtype=args.dtype, device=args.device)
    t0 = time.perf_counter()
    ds = datastore(lm, cache, args.chars, valid)
    LOG.info("datastore: %d entries, d=%d (%.1f s)", ds.count, ds.dim, time.perf_counter() - t0)
    return lm, ds, KNNLM(lm, {"wiki": ds.path}, lam=args.lam, k=args.k)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_setup_args(ap)
    ap.add_argument("--tokens", type=int, default=32, help="tokens generated per run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--output", default=str(HERE / "results" / "generate.md"))
    args = ap.parse_args()
    setup_logging("bench", fmt="bench: %(message)s")
    torch.manual_seed(0)
    lm, ds, knn = setup(args)
    n = args.tokens
    gen = dict(ignore_eos=True)

    def knn_ids(prompt, **kw):
        return knn.generate(prompt, n, **gen, **kw).ids

    def hf_knn(prompt):
        with knn.logits_processor(datastore="wiki") as proc:
            return hf_generate(lm, prompt, n, [proc])

    def each(fn):  # one prompt after the other
        return lambda prompts: [fn(p) for p in prompts]

    def batched(**kw):  # all prompts stepped together (knnlm.run.batch, as `knnlm serve` does)
        return lambda prompts: [g.ids for g in knn.generate_many(prompts, n, max_batch=len(prompts), **gen, **kw)]

    settings = {
        "base LM (KNNLM, datastore=None)": each(lambda p: knn_ids(p, datastore=None)),
        f"kNN-LM (KNNLM, k={args.k}, λ={args.lam})": each(lambda p: knn_ids(p, datastore="wiki")),
        f"kNN-LM (KNNLM, k=64, λ={args.lam})": each(lambda p: knn_ids(p, datastore="wiki", k=64)),
        "base LM (HF generate)": each(lambda p: hf_generate(lm, p, n)),
        f"kNN-LM (HF generate + KNNLogitsProcessor, k={args.k})": each(hf_knn),
        "base LM, no KV cache (prefix re-run per token)": each(lambda p: no_cache_generate(lm, p, n)),
        f"base LM, the {len(PROMPTS)} prompts as one batch (generate_many)": batched(datastore=None),
        f"kNN-LM, the {len(PROMPTS)} prompts as one batch (generate_many, k={args.k})": batched(datastore="wiki"),
    }
    for fn in settings.values():  # warm-up: allocator, faiss threads, tokenizer caches
        fn([PROMPTS[0][:20]])
    seconds: dict[str, list[float]] = {name: [] for name in settings}
    outputs: dict[str, list[list[int]]] = {name: [] for name in settings}
    for rep in range(args.repeats):
        for name, fn in settings.items():  # interleaved, so machine noise hits every setting alike
            t = time.perf_counter()
            ids = fn(PROMPTS)
            seconds[name].append(time.perf_counter() - t)
            assert all(len(i) == n for i in ids), name
            outputs[name] = ids
        LOG.info("repeat %d/%d done", rep + 1, args.repeats)

    names = list(settings)
    base = statistics.median(seconds[names[0]])
    base_ids, knn_ids_ = outputs[names[0]], outputs[names[1]]
    assert outputs[names[3]] == base_ids, "HF greedy and KNNLM(datastore=None) disagree"
    assert outputs[names[4]] == knn_ids_, "HF + KNNLogitsProcessor and KNNLM disagree"
    assert outputs[names[5]] == base_ids, "no-cache greedy and KV-cached greedy disagree"
    total = n * len(PROMPTS)
    rows = ["| setting | tokens/s | ratio to base LM |", "|---|---:|---:|"]
    for name in names:
        med = statistics.median(seconds[name])
        rows.append(f"| {name} | {total / med:.1f} | {base / med:.2f} |")
    changed = sum(a != b for a, b in zip(base_ids, knn_ids_))
    same_batched = (sum(a == b for a, b in zip(outputs[names[6]], base_ids)),  # padding rounds differently:
                    sum(a == b for a, b in zip(outputs[names[7]], knn_ids_)))  # a near-tie may flip
    env = (f"model {args.model} ({args.dtype}, {args.device}); datastore {ds.count} entries (d={ds.dim}, Flat) "
           f"from the first {args.chars} characters of wiki.valid.raw; {len(PROMPTS)} prompts x {n} greedy tokens "
           f"(EOS ignored), median of {args.repeats} interleaved repeats; torch {torch.__version__}, "
           f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    table = "\n".join(rows)
    print(env)
    print(table)
    agree = (f"kNN-LM (k={args.k}) output differs from the base LM's on {changed}/{len(PROMPTS)} prompts; KNNLM, HF "
             "generate (with and without the processor) and the no-cache loop agree token for token; batched "
             f"generation gives the one-at-a-time tokens on {same_batched[0]}/{len(PROMPTS)} (base) and "
             f"{same_batched[1]}/{len(PROMPTS)} (kNN-LM) prompts.")
    print(agree)
    sample = knn.generate(PROMPTS[0], 24, datastore="wiki").text
    print(f"sample (kNN-LM, prompt 1): {sample!r}")
    Path(args.output).write_text(
        "# Generation speed: kNN-LM vs base LM\n\n"
        f"Command: `{' '.join(['python', 'benchmarks/bench_generate.py', *sys.argv[1:]])}`\n\n"
        f"{data_note(['wiki.valid.raw'])}  Folder: `--data` (default `../shared/data`).\n\n"
        f"{env}.\n\n{table}\n\n{agree}\n\n"
        f"Sample (kNN-LM, prompt 1): `{sample!r}`\n",
        encoding="utf-8")
    LOG.info("wrote %s", args.output)


if __name__ == "__main__":
    run_main(main)
