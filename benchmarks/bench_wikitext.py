"""WikiText-2 benchmark of the kNN-LM on the default model.

Datastore from wiki.valid.raw without its last ~25k tokens (whole articles); lambda, T
and k tuned on those held-out articles; perplexity reported on wiki.test.raw.  Speed
ratios are measured in this run, on the same machine, with A/B runs interleaved.

    python benchmarks/bench_wikitext.py                    # all phases, ~40 min on 2 idle CPU cores
    python benchmarks/bench_wikitext.py --phases quality   # perplexities only
    python benchmarks/bench_wikitext.py --phases speed     # speed ratios only (run on an idle machine)

Data: wiki.valid.raw and wiki.test.raw of WikiText-2 raw in --data (default
../shared/data/wikitext-2-raw), checked by sha256 first (benchmarks/README.md).  The
datastore and indexes are built when missing (either phase), cached in benchmarks/cache/
(git-ignored) and reused.  Results: benchmarks/results/wikitext2.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import re
import resource
import time
from pathlib import Path

from common import (
    DEFAULT_DATA,
    WIKITEXT2_DIR,
    BenchError,
    add_data_arg,
    check_wikitext,
    data_note,
    run_main,
    setup_logging,
)

from knnlm.core.batching import plan_files
from knnlm.core.corpus import file_sha256
from knnlm.core.datastore import Datastore, build_datastore
from knnlm.core.index import Searcher, build_index, list_indexes
from knnlm.core.model import LM
from knnlm.core.scoring import interpolate, knn_target_logprobs, perplexity
from knnlm.run.evaluate import evaluate, open_for_model, score_plan
from knnlm.run.tune import sweep

HERE = Path(__file__).resolve().parent
DATA = DEFAULT_DATA / WIKITEXT2_DIR  # the WikiText-2 raw folder when none is given (other benchmarks import it)
LOG = logging.getLogger("bench")


def articles(text: str) -> list[str]:
    """Split WikiText into articles at top-level headings (` = Title = `)."""
    starts = [m.start() for m in re.finditer(r"^ = [^=].* = $", text, flags=re.M)]
    # a heading line is preceded by a blank line " \n"; cut at the start of that line
    return [text[a:b] for a, b in zip([0] + starts[1:], starts[1:] + [len(text)])]


def split_valid(lm: LM, cache: Path, heldout_tokens: int, data: Path = DATA) -> tuple[Path, Path]:
    """wiki.valid.raw (in `data`) cut into datastore text and the last whole articles
    (>= heldout_tokens tokens) held out for tuning."""
    text = (data / "wiki.valid.raw").read_text(encoding="utf-8")
    arts = articles(text)
    held, n = [], 0
    while n < heldout_tokens:
        a = arts.pop()
        held.insert(0, a)
        n += len(lm.encode(a, prefix=False))
    ds_txt, tune_txt = cache / "valid_datastore.txt", cache / "valid_heldout.txt"
    for path, parts in ((ds_txt, arts), (tune_txt, held)):
        body = "".join(parts)
        if not path.exists() or path.read_text(encoding="utf-8") != body:
            path.write_text(body, encoding="utf-8")
    LOG.info("valid: %d articles for the datastore, %d held out (%d tokens)", len(arts), len(held), n)
    return ds_txt, tune_txt


def test_subset(lm: LM, cache: Path, tokens: int, data: Path = DATA) -> Path:
    """The first whole articles of wiki.test.raw (in `data`), >= `tokens` tokens."""
    arts, out, n = articles((data / "wiki.test.raw").read_text(encoding="utf-8")), [], 0
    while n < tokens:
        a = arts.pop(0)
        out.append(a)
        n += len(lm.encode(a, prefix=False))
    path = cache / "test_subset.txt"
    path.write_text("".join(out), encoding="utf-8")
    return path


def bare_forward_seconds(lm: LM, plan, logits: bool = True) -> float:
    """The same model over the same windows, computing nothing else (with `logits=False`
    the output projection runs for the last position only, as in a datastore build)."""
    import torch

    kw = {} if logits else {"logits_to_keep": 1}
    t0 = time.perf_counter()
    with torch.inference_mode():
        for b in range(len(plan.batches)):
            lm.model(input_ids=plan.batch_input(b).to(lm.device), use_cache=False, **kw)
    if lm.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


APPROX, APPROX_NAME = "IVF2048,PQ64", "ivf2048-pq64"


def ensure_datastore(lm, args, res, ds_path, ds_txt, flat: bool) -> None:
    """The datastore of `ds_txt` and its IVF-PQ index (and Flat index if `flat`), built
    here when missing or made from another text; both phases need them."""
    W, S, B = 1024, 512, args.batch_tokens
    if not (ds_path / "meta.json").exists() or Datastore(ds_path).meta["corpora"][0]["sha256"] != file_sha256(ds_txt):
        LOG.info("building the datastore %s (once; cached)", ds_path)
        t0 = time.perf_counter()
        build_datastore(lm, [ds_txt], ds_path, window=W, stride=S, batch_tokens=B, overwrite=True)
        res["datastore_build_seconds"] = time.perf_counter() - t0
    ds = open_for_model(lm, ds_path)
    have = list_indexes(ds)
    if flat and "flat" not in have:
        build_index(ds, "Flat")
    if APPROX_NAME not in have:
        t0 = time.perf_counter()
        build_index(ds, APPROX, nprobe=args.nprobe)
        res["ivfpq_build_seconds"] = time.perf_counter() - t0


def quality(lm, args, res, cache, ds_path, ds_txt, tune_txt, test_txt, sub_txt) -> None:
    """Datastore, tuning, test perplexities, exact vs approximate search."""
    W, S, B = 1024, 512, args.batch_tokens
    ensure_datastore(lm, args, res, ds_path, ds_txt, flat=True)
    ds = open_for_model(lm, ds_path)
    files = ("keys.npy", "vals.npy", "tokens.npy", "docs.npy")
    res["datastore"] = {"entries": ds.count, "dim": ds.dim,
                        "bytes_per_entry": sum((ds_path / f).stat().st_size for f in files) / ds.count,
                        "key_bytes_per_entry": (ds_path / "keys.npy").stat().st_size / ds.count}
    res["index"] = {"approx": APPROX, "nprobe": args.nprobe}
    ivf = Searcher(ds, APPROX_NAME, nprobe=args.nprobe)

    # ---- tune on the held-out validation articles ----
    s = score_plan(lm, plan_files(lm, [tune_txt], W, S, B), ivf, k=args.k, keep_neighbors=True)
    tuned = sweep(s.lm, s.dists, s.vals, s.targets)
    best = tuned["best"]
    res["tune"] = {"tokens": tuned["tokens"], "ppl_lm": tuned["ppl_lm"], "best": best}
    LOG.info("tuned: %s", res["tune"])
    del s

    # ---- full test set with IVF-PQ + re-ranking ----
    s = score_plan(lm, plan_files(lm, [test_txt], W, S, B), ivf, k=args.k, keep_neighbors=True)
    knn_best = knn_target_logprobs(s.dists[:, : best["k"]], s.vals[:, : best["k"]], s.targets, best["temperature"])
    knn_default = knn_target_logprobs(s.dists, s.vals, s.targets, 1.0)
    res["test"] = {"tokens": int(len(s.targets)), "ppl_lm": perplexity(s.lm),
                   "ppl_knnlm_default": perplexity(interpolate(s.lm, knn_default, 0.25)),
                   "ppl_knnlm_tuned": perplexity(interpolate(s.lm, knn_best, best["lambda"])),
                   "seconds": s.seconds}
    LOG.info("test: %s", res["test"])
    del s

    # ---- exact vs approximate on the test subset ----
    sub = {}
    kw = dict(k=best["k"], lam=best["lambda"], temperature=best["temperature"], window=W, stride=S,
              batch_tokens=B, progress=True)
    for name, index, rerank in (("flat", "flat", None), ("ivfpq_rerank", "ivf2048-pq64", True),
                                ("ivfpq_no_rerank", "ivf2048-pq64", False)):
        r = evaluate(lm, [sub_txt], ds_path, index=index, rerank=rerank, nprobe=args.nprobe, **kw)
        sub[name] = {"ppl_knnlm": r["ppl_knnlm"], "seconds_knn": r["seconds_knn"]}
        sub["ppl_lm"] = r["ppl_lm"]
    sub["tokens"] = r["tokens"]
    sub["rerank_vs_flat"] = sub["ivfpq_rerank"]["ppl_knnlm"] / sub["flat"]["ppl_knnlm"] - 1
    res["exact_vs_approx"] = sub
    LOG.info("exact vs approx: %s", sub)



def speed(lm, args, res, cache, ds_path, ds_txt, sub_txt) -> None:
    """Build and eval throughput ratios, A/B runs interleaved on the test subset."""
    W, S, B = 1024, 512, args.batch_tokens
    ensure_datastore(lm, args, res, ds_path, ds_txt, flat=False)  # the eval-speed runs search it; first
    # ---- build speed vs the bare forward pass (interleaved A/B on the test subset) ----
    sub_plan = plan_files(lm, [sub_txt], W, S, B)
    bare, bare_keys, build = [], [], []
    for rep in range(2):
        bare.append(bare_forward_seconds(lm, sub_plan))
        bare_keys.append(bare_forward_seconds(lm, sub_plan, logits=False))
        t0 = time.perf_counter()
        build_datastore(lm, [sub_txt], cache / "speed_ds", window=W, stride=S, batch_tokens=B, overwrite=True,
                        progress=False)
        build.append(time.perf_counter() - t0)
    res["build_speed"] = {"tokens": sub_plan.count, "bare_forward_tok_s": sub_plan.count / min(bare),
                          "bare_forward_no_logits_tok_s": sub_plan.count / min(bare_keys),
                          "build_tok_s": sub_plan.count / min(build),
                          "ratio": min(bare) / min(build), "ratio_vs_no_logits": min(bare_keys) / min(build),
                          "runs_s": {"bare": bare, "bare_no_logits": bare_keys, "build": build}}
    LOG.info("build speed: %s", res["build_speed"])

    # ---- eval speed: base LM vs kNN-LM (IVF-PQ + re-ranking, k=1024), interleaved ----
    base_t, knn_t = [], []
    for rep in range(2):
        base_t.append(evaluate(lm, [sub_txt], window=W, stride=S, batch_tokens=B, progress=False)["seconds"])
        knn_t.append(evaluate(lm, [sub_txt], ds_path, index=APPROX_NAME, k=args.k, nprobe=args.nprobe,
                              window=W, stride=S, batch_tokens=B, progress=False)["seconds"])
    res["eval_speed"] = {"tokens": sub_plan.count, "base_tok_s": sub_plan.count / min(base_t),
                         "knnlm_tok_s": sub_plan.count / min(knn_t), "ratio": min(base_t) / min(knn_t),
                         "k": args.k, "runs_s": {"base": base_t, "knnlm": knn_t}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--heldout-tokens", type=int, default=25_000)
    ap.add_argument("--subset-tokens", type=int, default=30_000, help="test tokens for speed and exact-index runs")
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--nprobe", type=int, default=32)
    ap.add_argument("--cache", default=str(HERE / "cache" / "wikitext2"))
    ap.add_argument("--out", default=str(HERE / "results" / "wikitext2"))
    ap.add_argument("--phases", default="quality,speed", help="comma-separated: quality, speed")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--batch-tokens", type=int, default=4096, help="padded tokens per forward pass")
    add_data_arg(ap)
    args = ap.parse_args()
    phases = set(args.phases.split(","))
    if not phases or phases - {"quality", "speed"}:
        raise BenchError(f"--phases takes quality, speed or both, got {args.phases!r}")
    setup_logging("bench")
    data = check_wikitext(args.data)  # before anything long
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    old = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    res: dict = {**old, "model": args.model, "dtype": args.dtype, "machine": platform.machine(),
                 "device": args.device if args.device == "cpu" else __import__("torch").cuda.get_device_name()}
    res.setdefault("commands", {})["+".join(sorted(phases))] = "python benchmarks/bench_wikitext.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("cache", "out", "data"))
    res["data"] = data_note()
    lm = LM.load(args.model, dtype=args.dtype, device=args.device)
    ds_txt, tune_txt = split_valid(lm, cache, args.heldout_tokens, data)
    test_txt = data / "wiki.test.raw"
    sub_txt = test_subset(lm, cache, args.subset_tokens, data)
    ds_path = cache / f"ds-{args.dtype}"
    if "quality" in phases:
        quality(lm, args, res, cache, ds_path, ds_txt, tune_txt, test_txt, sub_txt)
    if "speed" in phases:
        speed(lm, args, res, cache, ds_path, ds_txt, sub_txt)
    res[f"peak_rss_mb_{'_'.join(sorted(phases))}"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
    report = render(res)
    out.with_suffix(".md").write_text(report)
    print(report)


def render(r: dict) -> str:
    def ok(cond):
        return "met" if cond else "MISSED"

    rows = [("model, dtype", f"{r['model']}, {r['dtype']}")]
    if "test" in r:
        t, b, sub = r["test"], r["tune"]["best"], r["exact_vs_approx"]
        rows += [
            ("datastore", f"{r['datastore']['entries']} entries (wiki.valid.raw minus {r['tune']['tokens']} held-out "
                          f"tokens), d={r['datastore']['dim']}, {r['datastore']['bytes_per_entry']:.1f} bytes/entry "
                          f"({r['datastore']['key_bytes_per_entry']:.0f} of them the key)"),
            ("tuned on held-out valid (IVF-PQ+rerank)", f"k={b['k']} lambda={b['lambda']} T={b['temperature']} "
                                                       f"(ppl {r['tune']['ppl_lm']:.3f} -> {b['ppl']:.3f})"),
            ("test tokens (all of wiki.test.raw)", str(t["tokens"])),
            ("test ppl, base LM", f"{t['ppl_lm']:.3f}"),
            ("test ppl, kNN-LM IVF-PQ+rerank, tuned", f"{t['ppl_knnlm_tuned']:.3f}"),
            ("test ppl, kNN-LM IVF-PQ+rerank, paper defaults (k=1024, lambda=0.25, T=1)",
             f"{t['ppl_knnlm_default']:.3f}"),
            (f"test subset ({sub['tokens']} tok), tuned: ppl base / exact Flat / IVF-PQ+rerank / IVF-PQ only",
             f"{sub['ppl_lm']:.3f} / {sub['flat']['ppl_knnlm']:.3f} / {sub['ivfpq_rerank']['ppl_knnlm']:.3f} / "
             f"{sub['ivfpq_no_rerank']['ppl_knnlm']:.3f}"),
            ("IVF-PQ+rerank vs exact (target: within 1%)",
             f"{100 * sub['rerank_vs_flat']:+.2f}% — {ok(abs(sub['rerank_vs_flat']) <= 0.01)}"),
        ]
    if "build_speed" in r:
        bs, es = r["build_speed"], r["eval_speed"]
        rows += [
            ("build tok/s vs bare forward with logits (target >= 0.9)",
             f"{bs['build_tok_s']:.0f} / {bs['bare_forward_tok_s']:.0f} = {bs['ratio']:.2f}x — {ok(bs['ratio'] >= 0.9)}"),
            ("build tok/s vs bare forward without logits (stricter)",
             f"{bs['build_tok_s']:.0f} / {bs['bare_forward_no_logits_tok_s']:.0f} = {bs['ratio_vs_no_logits']:.2f}x"),
            (f"eval tok/s kNN-LM (IVF-PQ+rerank, k={es['k']}) vs base LM (target >= 0.7)",
             f"{es['knnlm_tok_s']:.0f} / {es['base_tok_s']:.0f} = {es['ratio']:.2f}x — {ok(es['ratio'] >= 0.7)}"),
        ]
    rows += [(f"peak RSS ({k[len('peak_rss_mb_'):]})", f"{v:.0f} MB") for k, v in sorted(r.items())
             if k.startswith("peak_rss_mb_")]
    lines = ["# WikiText-2 benchmark", "", "Commands (one per phase; tokens/s count scored tokens, each window of",
             "1024 scores 512):", ""]
    lines += [f"    {c}" for c in r.get("commands", {}).values()]
    lines += ["", r.get("data", data_note()) + "  The data folder is `--data` (default `../shared/data`); "
              "the datastore and indexes are built on first use and cached in `benchmarks/cache/wikitext2/`."]
    lines += ["", "| measure | value |", "|---|---|"] + [f"| {a} | {b_} |" for a, b_ in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_main(main)
