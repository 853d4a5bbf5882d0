"""The `knnlm` command: a thin edge over the library.  Every subcommand's --help ends
with runnable examples; bad input ends in one `error: ...` line and exit status 1."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from knnlm.cli.checks import check_memories, check_text_command, check_texts, check_window_args
from knnlm.cli.common import (
    Formatter,
    add_fewer_searches_args,
    add_knn_args,
    add_model_args,
    add_window_args,
    finishing,
    finishing_mark,
    load_lm,
    numbers,
    print_tuned,
    quiet_transformers,
    searcher_from_args,
    settings_from_args,
    subcommand_adder,
    table,
    write_json,
)
from knnlm.cli.memory import add_memory_args
from knnlm.errors import KnnlmError

LOG = logging.getLogger("knnlm")
RETUNE_SHARE = 0.1  # `knnlm info` advises re-tuning once this share of the entries was added since tuning
SOURCES = {"datastore": "the datastore's tuned settings", "paper": "the paper's defaults", "explicit": "as given"}
CACHE_SOURCES = {"datastore": "the datastore's tuned one", "default": "the default", "explicit": "as given"}


# ---- subcommands ---------------------------------------------------------------------
def cmd_build(args) -> None:
    from knnlm.core.batching import WindowSettings
    from knnlm.core.datastore import BuildSettings, Datastore, build_datastore
    from knnlm.core.index import build_index, list_indexes
    from knnlm.core.index_fill import IndexSettings

    check_texts(args.corpus)
    check_window_args(args)
    if Path(args.output).exists() and not args.overwrite and not finishing_mark(args.output).exists():
        raise KnnlmError(f"{args.output} already exists (use --overwrite to replace it)")
    lm = load_lm(args, key_point=args.key_point)
    with finishing(args.output, args.overwrite) as published:  # published: only the index and tuning are left
        if args.workers:
            from knnlm.cli.scale import build_on_ray

            return build_on_ray(args, lm, published)
        index = IndexSettings(args.index) if args.index != "none" else None  # made during the forward pass
        settings = BuildSettings(WindowSettings(args.window, args.stride, args.batch_tokens), index=index)
        out = Path(args.output) if published else build_datastore(
            lm, args.corpus, args.output, settings, overwrite=args.overwrite, progress=not args.quiet)[0]
        ds = Datastore(out)
        print(f"datastore {out}: {ds.count} entries, d={ds.dim}, key point {ds.key_point}")
        if index is not None:
            names = list_indexes(ds)  # a datastore published by an older knnlm may have none
            idx = ds.path / "indexes" / names[0] if names else build_index(ds, args.index, overwrite=published,
                                                                             progress=not args.quiet)
            print(f"index {idx}")
            if not args.no_tune:
                from knnlm.run.selftune import self_tune

                print_tuned(self_tune(lm, ds, sample_tokens=args.tune_tokens, batch_tokens=args.batch_tokens,
                                      progress=not args.quiet))


def cmd_index(args) -> None:
    from knnlm.core.index import build_index
    from knnlm.scale import ShardedDatastore, open_datastore
    from knnlm.scale.index import build_sharded_index

    ds = open_datastore(args.datastore)
    if isinstance(ds, ShardedDatastore):
        path = build_sharded_index(ds, args.type, name=args.name, train_size=args.train_size, nprobe=args.nprobe,
                                   overwrite=args.overwrite, backend="ray" if args.workers else "local",
                                   ray_address=args.ray_address, progress=not args.quiet)
    else:
        path = build_index(ds, args.type, name=args.name, train_size=args.train_size, nprobe=args.nprobe,
                           overwrite=args.overwrite, progress=not args.quiet)
    info = json.loads((path / "index.json").read_text())
    print(f"index {path}: {info['factory']}, {info['ntotal']} keys, built in {info['build_seconds']} s")


def cmd_eval(args) -> None:
    from knnlm.run.evaluate import evaluate

    check_text_command(args, datastore_needed=False)
    settings = settings_from_args(args)  # checked before the model loads
    if args.memory:
        check_memories([args.memory])
    lm = load_lm(args, args.datastore, memory=args.memory)
    res = evaluate(lm, args.text, args.datastore, args.memory, **settings, progress=not args.quiet)
    rows = [("tokens", str(res["tokens"]))]
    if res["mixed"]:  # the headline: the whole mixture, what generation and the server give too
        names = {"datastore": "datastore", "cache": "continuous cache", "memory": "memory decoder"}
        rows.append(("ppl", f"{res['ppl']:.3f}  ({100 * (res['ppl'] / res['ppl_lm'] - 1):+.2f}%)  LM + "
                            + " + ".join(names[m] for m in res["mixed"])))
    rows.append(("ppl LM", f"{res['ppl_lm']:.3f}"))
    if "ppl_knnlm" in res:
        rows.append(("ppl kNN-LM", f"{res['ppl_knnlm']:.3f}  ({100 * (res['ppl_knnlm'] / res['ppl_lm'] - 1):+.2f}%)"))
        lam = (f"lambda={res['lambda']} adaptive (ended at {res['lambda_adapted']:.3g})"
               if res["lambda_mode"] == "adaptive" else f"lambda={res['lambda']}")
        if "lambda_by_distance" in res:
            t = res["lambda_by_distance"]
            lam += (f" by nearest distance and LM confidence ({len(t['lambdas'])} x {len(t['lambdas'][0])} buckets)"
                    if "confidence_edges" in t else f" by nearest distance ({len(t['lambdas'])} buckets)")
        rows.append(("settings", f"k={res['k']} {lam} T={res['temperature']} "
                                 f"({SOURCES[res['settings_source']]}) index={res['factory']} rerank={res['rerank']}"))
        if res["search_rate"] < 1 or settings["retrieval"].pointers or settings["retrieval"].adaptive:
            rows.append(("searches", f"{100 * res['search_rate']:.1f}% of tokens"))
    if "ppl_cache" in res:
        label = "ppl kNN-LM + cache" if "ppl_knnlm" in res else "ppl LM + cache"
        rows.append((label, f"{res['ppl_cache']:.3f}  ({100 * (res['ppl_cache'] / res['ppl_lm'] - 1):+.2f}%)"))
        adapted = f" (adaptive, ended at {res['cache_lambda_adapted']:.3f})" if "cache_lambda_adapted" in res else ""
        rows.append(("cache", f"lambda={res['cache_lambda']}{adapted} ({CACHE_SOURCES[res['cache_lambda_source']]}) "
                              f"theta={res['cache_theta']} size={res['cache_size']}"))
    for key, label in (("ppl_memory", "ppl LM + memory"), ("ppl_knnlm_memory", "ppl kNN-LM + memory")):
        if key in res:
            rows.append((label, f"{res[key]:.3f}  ({100 * (res[key] / res['ppl_lm'] - 1):+.2f}%)  "
                                f"memory lambda={res['memory_lambda']} {res['memory_lambda_mode']}"))
    rows.append(("tokens/s", str(res["tokens_per_second"])))
    print(table(rows))
    if args.output:
        write_json(args.output, res)
        print(f"wrote {args.output}")


def cmd_tune(args) -> None:
    from knnlm.core.batching import plan_files
    from knnlm.core.scoring import check_settings
    from knnlm.run.evaluate import open_for_model, score_plan
    from knnlm.run.options import RetrievalSettings
    from knnlm.run.tune import DEFAULT_LAMBDAS, DEFAULT_TEMPERATURES, sweep

    if args.memory:
        from knnlm.cli.memory import cmd_tune_memory

        return cmd_tune_memory(args)
    lambdas = numbers(args.lambdas, float, "--lambdas") or DEFAULT_LAMBDAS
    temps = numbers(args.temperatures, float, "--temperatures") or DEFAULT_TEMPERATURES
    ks = numbers(args.ks, int, "--ks")
    for lam in lambdas:
        check_settings(lam=lam)
    for t in temps:
        check_settings(temperature=t)
    for k in ks or [args.k or 1]:
        check_settings(k=k)
    if ks and args.k and max(ks) > args.k:
        raise KnnlmError(f"--ks goes up to {max(ks)} but only --k {args.k} neighbours are retrieved")
    check_text_command(args)
    lm = load_lm(args, args.datastore)
    ds = open_for_model(lm, args.datastore)
    k = args.k or max([min(1024, ds.count)] + (ks or []))
    searcher = searcher_from_args(args, ds)
    plan = plan_files(lm, args.text, args.window, args.stride, args.batch_tokens)
    s = score_plan(lm, plan, searcher, retrieval=RetrievalSettings(k=k), keep_neighbors=True,
                   progress=not args.quiet)
    res = sweep(s.lm, s.dists, s.vals, s.targets, lambdas, temps, ks, counts=ds.counts_of(s.ids))
    res.update(datastore=str(ds.path), texts=args.text, model=lm.name, k_retrieved=k, **searcher.settings(),
               window=args.window, stride=args.stride)
    b = res["best"]
    print(table([("tokens", str(res["tokens"])), ("ppl LM", f"{res['ppl_lm']:.3f}"),
                  ("best ppl kNN-LM", f"{b['ppl']:.3f}"),
                  ("best", f"k={b['k']} lambda={b['lambda']} T={b['temperature']}"),
                  ("adaptive lambda", f"ppl {res['best_adaptive']['ppl']:.3f} (from the best lambda, as commands "
                                      f"use it; ended at {res['best_adaptive']['lambda_adapted']:.3g})")]))
    write_json(args.output, res)
    print(f"wrote {args.output} ({len(res['grid'])} settings)")
    if args.save:
        ds.record_settings({"k": int(b["k"]), "lambda": float(b["lambda"]), "temperature": float(b["temperature"]),
                            "how": "knnlm tune on held-out text", "texts": [str(t) for t in args.text],
                            "tokens": res["tokens"], "index": searcher.settings(), "ppl_lm": res["ppl_lm"],
                            "ppl_knnlm": float(b["ppl"]),
                            "tuned": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        print(f"saved in {ds.path / 'meta.json'}: commands now default to these settings")


def cmd_explain(args) -> None:
    from knnlm.core.batching import plan_files
    from knnlm.core.scoring import check_settings
    from knnlm.core.settings import cache_params, cache_weight, resolve
    from knnlm.run.evaluate import open_for_model, score_plan
    from knnlm.run.options import CacheSettings, RetrievalSettings
    from knnlm.run.explain import ExplainSettings, explain, render

    if args.memory and args.html:
        raise KnnlmError("--html shows a datastore's memories: it does not take --memory")
    if args.memory:
        from knnlm.cli.memory import cmd_explain_memory

        return cmd_explain_memory(args)
    check_settings(lam=args.lam, temperature=args.temperature, k=args.k)
    if args.top < 1 or args.neighbors < 0:
        raise KnnlmError(f"need --top >= 1 and --neighbors >= 0, got {args.top} and {args.neighbors}")
    check_text_command(args)
    lm = load_lm(args, args.datastore)
    ds = open_for_model(lm, args.datastore)
    r = resolve(ds.meta, ds.count, args.k, args.lam, args.temperature, paper=args.paper_defaults, name=str(ds.path),
                lambda_mode=args.lambda_mode, by_distance=args.lambda_by_distance)
    searcher = searcher_from_args(args, ds)
    plan = plan_files(lm, args.text, args.window, args.stride, args.batch_tokens)
    # the continuous cache, as every command mixes it: by default the datastore's tuned cache λ, adapting
    cw = None if args.cache_lambda is None and args.paper_defaults else \
        cache_weight(ds.meta, args.cache_lambda, args.lambda_mode)[0]
    cw = None if cw is None or cw.lam == 0 else cw
    s = score_plan(lm, plan, searcher, retrieval=RetrievalSettings(k=r.k, temperature=r.temperature),
                   cache=CacheSettings(*cache_params(ds.meta, args.cache_theta, args.cache_size))
                   if cw is not None else None,
                   keep_neighbors=True, progress=not args.quiet)
    if args.html:
        write_page(args.html, lm, ds, s, r, args.neighbors, ", ".join(str(t) for t in args.text))
        if not args.output:
            return
    items = explain(lm, ds, s, r, ExplainSettings(top=args.top, neighbors=args.neighbors), cache=cw)
    text = render(items)
    print(text)
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n", encoding="utf-8")
        write_json(out.with_suffix(".json"), items)
        print(f"wrote {out} and {out.with_suffix('.json')}")


def write_page(path: str, lm, ds, scores, resolved, neighbors: int, source: str) -> None:
    """`knnlm explain --html`: the inspector page with this text's scores in it (no server needed)."""
    from knnlm.run.inspect import page_score
    from knnlm.serve.page import render_page

    data = {"model": lm.name, "source": source, "score": page_score(lm, ds, scores, resolved, neighbors)}
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(render_page(data), encoding="utf-8")
    tmp.replace(out)
    print(f"wrote {out} ({len(scores.targets)} tokens; open it in a browser)")


def cmd_info(args) -> None:
    from knnlm.core.index import list_indexes, verify_indexes
    from knnlm.scale import open_datastore

    if (Path(args.datastore) / "memory.json").is_file():
        return cmd_info_decoder(args)
    ds = open_datastore(args.datastore)
    if args.verify:
        ds.verify()
        index_files = verify_indexes(ds)
    m = ds.meta
    parts = getattr(ds, "shards", [ds])
    bytes_total = sum((p.path / f).stat().st_size for p in parts
                      for f in ("keys.npy", "vals.npy", "tokens.npy", "docs.npy"))
    rows = [
        ("datastore", str(ds.path)),
        *([("shards", f"{len(parts)}: " + ", ".join(str(p.count) for p in parts) + " entries")]
          if hasattr(ds, "shards") else []),
        ("entries", str(ds.count)),
        *([("removed", f"{len(m.get('removed', []))} documents, {ds.count - ds.live} entries: no search returns "
                       "them (`knnlm compact` rewrites the files without them)")] if ds.live < ds.count else []),
        *([("version", f"{ds.version} ({len(m.get('edits', []))} edits; last: {m['edits'][-1]['op']} at "
                       f"{m['edits'][-1]['when']})")] if m.get("edits") else []),
        ("documents", str(m["documents"])),
        ("dim", str(ds.dim)),
        ("key point", ds.key_point),
        ("model", f"{m['identity']['model']} ({m['model_dtype']}, {m['identity']['model_fingerprint']})"),
        ("window/stride", f"{m['window']}/{m['stride']}"),
        ("corpora", ", ".join(c["name"] for c in m["corpora"])),
        ("bytes/entry", f"{bytes_total / max(ds.count, 1):.1f}"),
        ("indexes", ", ".join(list_indexes(ds)) or "none"),
        ("created", m["created"]),
    ]
    t = ds.settings
    if t is None:
        rows.append(("settings", "none recorded: the paper's k=1024 lambda=0.25 T=1 "
                                 "(`knnlm tune HELDOUT -d DS --save` records tuned ones)"))
    else:
        on = t.get("datastore_version", ds.version)  # the datastore version they were tuned on
        rows.append(("settings", f"k={t['k']} lambda={t['lambda']} T={t['temperature']}, {t.get('how', 'tuned')} "
                                 f"({t.get('tokens', '?')} tokens: ppl {t.get('ppl_lm', float('nan')):.3f} -> "
                                 f"{t.get('ppl_knnlm', float('nan')):.3f})"
                                 + (f"; tuned on version {on}" if on != ds.version else "")))
    added = int(m.get("added_since_tuning", 0))
    if t is not None and added >= RETUNE_SHARE * ds.count:
        rows.append(("re-tuning", f"advised: {added / ds.count:.0%} of the entries were added since these settings "
                                  "were tuned (`knnlm tune HELDOUT -d DS --save`, or `knnlm add --retune`)"))
    rows.append(("lambda mode", "adaptive by default: starts at the lambda above and follows the text being scored "
                                "(--lambda-mode fixed keeps it)"))
    if args.verify:
        rows.append(("checksums", "ok" + (f" (all {len(parts)} shards)" if hasattr(ds, "shards") else "")
                     + (f", {len(index_files)} index files" if index_files else "")))
    print(table(rows))


def cmd_info_decoder(args) -> None:
    from knnlm.memory.decoder import read_meta, verify_decoder

    m = read_meta(args.datastore)
    rows = [("memory decoder", args.datastore), ("base model", str(m["base_model"])), ("layers", str(m["layers"]))]
    if args.verify:
        files = verify_decoder(args.datastore)
        rows.append(("checksums", f"ok ({len(files)} files)" if files else "none recorded"))
    print(table(rows))


def cmd_demo(args) -> None:
    from knnlm.run.demo import run_demo

    quiet_transformers()
    run_demo(args.workdir, articles=args.articles, heldout=args.heldout, dtype=args.dtype or "bfloat16",
             device=args.device, progress=not args.quiet)


# ---- parser --------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="knnlm",
        formatter_class=Formatter,
        description="kNN-LM: make a pretrained causal LM better without training, by letting it remember.",
        epilog="examples:\n"
               "  knnlm demo                                   # everything, on the built-in defaults\n"
               "  knnlm build corpus.txt -o ds                 # datastore + index + its own tuned settings\n"
               "  knnlm eval test.txt -d ds                    # perplexity with and without it\n"
               "run `knnlm COMMAND --help` for each command's options and examples.",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info messages")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    add = subcommand_adder(sub)

    sp = add("build", cmd_build, "build a datastore (and its index) from text",
             "  knnlm build wiki.valid.raw -o ds-wiki\n"
             "  knnlm build docs.jsonl more.jsonl -o ds-docs --model gpt2 --dtype float32\n"
             "  knnlm build corpus.txt -o ds --key-point final --index none\n"
             "  knnlm build corpus.txt -o ds --no-tune       # keep the paper's k, lambda, T as defaults\n"
             "  knnlm build wiki.jsonl -o ds-sharded --workers 4       # 4 shards built by a local Ray\n"
             "  knnlm build wiki.jsonl -o ds-sharded --workers 16 --ray-address HEAD:6379\n"
             "  knnlm build novels/*.txt.gz -o ds-novels       # gzip files are read as they are\n"
             "  (.txt = one stream; .jsonl = one document per line, field 'text'; either may be .gz;\n"
             "   an interrupted build resumes when the same command runs again)")
    sp.add_argument("corpus", nargs="+", help=".txt or .jsonl files (or their .gz)")
    sp.add_argument("-o", "--output", required=True, help="datastore directory to create")
    sp.add_argument("--overwrite", action="store_true", help="replace an existing datastore")
    sp.add_argument("--index", default="auto",
                    help="index made during the build (trained on the first keys, filled as the keys are written): "
                         "auto (by size), Flat, a FAISS factory string, none")
    sp.add_argument("--no-tune", action="store_true",
                    help="skip tuning k, lambda and T on the datastore's own corpus (leave-own-document-out)")
    sp.add_argument("--tune-tokens", type=int, default=16384, help="positions of the corpus the tuning reads")
    sp.add_argument("--workers", type=int, default=0,
                    help="build a sharded datastore with N Ray workers, one shard each (0: one process, no Ray)")
    sp.add_argument("--ray-address", default=None, help="with --workers: join this Ray cluster (default: local)")
    add_model_args(sp, with_key_point=True)
    add_window_args(sp)

    sp = add("index", cmd_index, "build a FAISS index over a datastore",
             "  knnlm index ds                              # auto: Flat below 100k entries, IVF-PQ above\n"
             "  knnlm index ds --type Flat\n"
             "  knnlm index ds --type IVF1024,PQ64 --nprobe 32 --train-size 200000")
    sp.add_argument("datastore")
    sp.add_argument("--type", default="auto", help="auto (Flat below 100k entries; IVF with about 4 sqrt(N) lists and PQ codes above, an HNSW32 coarse quantizer from 8,192 lists), Flat or any FAISS factory string")
    sp.add_argument("--name", default=None, help="index name (default: from the type)")
    sp.add_argument("--nprobe", type=int, default=32, help="default IVF lists probed per query")
    sp.add_argument("--train-size", type=int, default=None,
                    help="keys sampled to train the index (default: 64 per IVF list, at least 65,536)")
    sp.add_argument("--overwrite", action="store_true", help="replace an index of the same name")
    sp.add_argument("--workers", type=int, default=0,
                    help="sharded datastore: add the shards' keys in parallel Ray tasks (0: here, one by one)")
    sp.add_argument("--ray-address", default=None, help="with --workers: join this Ray cluster (default: local)")

    sp = add("eval", cmd_eval, "perplexity of the LM and the kNN-LM on a text",
             "  knnlm eval wiki.test.raw                    # base LM only\n"
             "  knnlm eval wiki.test.raw -d ds-wiki -o result.json   # k, lambda, T: the datastore's tuned ones\n"
             "  knnlm eval wiki.test.raw -d ds-wiki --paper-defaults # k=1024, lambda=0.25, T=1\n"
             "  knnlm eval test.jsonl -d ds --lambda 0.65 -k 256 --temperature 2 --index flat\n"
             "  knnlm eval wiki.test.raw -d ds-wiki --cache-lambda 0       # the kNN-LM without the continuous cache\n"
             "  knnlm eval wiki.test.raw -d ds-wiki --cache-lambda 0.1 --cache-theta 0.05 --cache-size 2000\n"
             "  knnlm eval wiki.test.raw -d ds-wiki --pointers 64          # RetoMaton: fewer searches\n"
             "  knnlm eval wiki.test.raw -d ds-wiki --adaptive 0.9         # no search where max p_LM >= 0.9\n"
             "  knnlm eval wiki.test.raw --memory mem-wiki --memory-lambda 0.3   # memory decoder, no search")
    sp.description = ("Perplexity of the LM and of the LM with its memories on a text.  The first line, ppl, is "
                      "the whole mixture, as generation and the server give it: the datastore (-d), then the "
                      "continuous cache (by default where the datastore tuned a cache lambda above 0; "
                      "--cache-lambda 0: none), then a memory decoder (--memory); the lines below it break it down "
                      "(ppl kNN-LM: the datastore alone).")
    sp.add_argument("text", nargs="+", help=".txt or .jsonl files (or their .gz)")
    sp.add_argument("-o", "--output", help="write the result as JSON")
    add_knn_args(sp, cache=True)
    add_fewer_searches_args(sp)
    add_memory_args(sp)
    add_model_args(sp)
    add_window_args(sp)

    sp = add("tune", cmd_tune, "sweep lambda, temperature and k from one retrieval",
             "  knnlm tune heldout.txt -d ds-wiki -o tune.json\n"
             "  knnlm tune heldout.txt -d ds --lambdas 0.1,0.25,0.5 --temperatures 1,2 --ks 8,64,1024\n"
             "  knnlm tune heldout.txt -d ds --save          # later commands default to the best setting\n"
             "  knnlm tune heldout.txt --memory mem-wiki [-d ds-wiki]   # the memory decoder's lambda")
    sp.add_argument("text", nargs="+", help=".txt or .jsonl files, or their .gz (a tuning split, not the test set)")
    sp.add_argument("-o", "--output", default="tune.json", help="JSON with the whole grid and the best setting")
    sp.add_argument("--lambdas", help="comma-separated (default: 0, 0.05, ..., 1)")
    sp.add_argument("--temperatures", help="comma-separated (default: 0.25 ... 16)")
    sp.add_argument("--ks", help="comma-separated, each <= -k (default: powers of two up to -k)")
    sp.add_argument("--save", action="store_true",
                    help="record the best setting in the datastore: commands then default to it")
    add_knn_args(sp, lam=False)
    add_memory_args(sp)
    add_model_args(sp)
    add_window_args(sp)

    sp = add("explain", cmd_explain, "show the tokens where the datastore helped most, with their memories",
             "  knnlm explain article.txt -d ds-wiki\n"
             "  knnlm explain article.txt -d ds --top 20 --neighbors 8 -o explain.md\n"
             "  knnlm explain article.txt -d ds --html article.html   # the inspector page, no server needed\n"
             "  knnlm explain article.txt --memory mem-wiki [-d ds-wiki]  # where the memory decoder disagrees most")
    sp.add_argument("text", nargs="+", help=".txt or .jsonl files (or their .gz)")
    sp.add_argument("--top", type=int, default=10, help="tokens shown")
    sp.add_argument("--neighbors", type=int, default=5, help="neighbours shown per token")
    sp.add_argument("-o", "--output", help="write markdown here and JSON beside it")
    sp.add_argument("--html", metavar="OUT.html",
                    help="write the whole text as an interactive page (every token coloured, its memories, "
                         "λ/T/k sliders) that opens in a browser without a server")
    add_knn_args(sp, cache=True)
    add_memory_args(sp)
    add_model_args(sp)
    add_window_args(sp)

    sp = add("info", cmd_info, "describe a datastore or a memory decoder",
             "  knnlm info ds-wiki\n"
             "  knnlm info ds-wiki --verify                 # recompute checksums (indexes' too)\n"
             "  knnlm info mem-wiki --verify                # a memory decoder's")
    sp.add_argument("datastore", help="a datastore (sharded or not) or a memory decoder directory")
    sp.add_argument("--verify", action="store_true",
                    help="check every file against the sha256 recorded when it was written")

    sp = add("demo", cmd_demo, "the whole pipeline on the built-in model and Wikipedia lead sections",
             "  knnlm demo\n"
             "  knnlm demo --workdir /tmp/knnlm-demo --articles 800")
    sp.add_argument("--workdir", default="knnlm-demo", help="where datastore and results go")
    sp.add_argument("--articles", type=int, default=300, help="articles in each datastore")
    sp.add_argument("--heldout", type=int, default=20, help="held-out test articles of each language")
    sp.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None, help="model dtype")
    sp.add_argument("--device", default="auto", help="cpu, cuda or auto")
    from knnlm.cli.generate import register
    from knnlm.cli.scale import register as register_scale

    register(add, add_model_args, add_knn_args, add_fewer_searches_args)
    from knnlm.cli.reduce import register as register_reduce

    register_reduce(add)
    from knnlm.cli.memory import register as register_memory

    register_memory(sub, add_model_args)
    register_scale(add)
    from knnlm.cli.edit import register as register_edit

    register_edit(add, add_model_args, add_knn_args, add_window_args)
    return p


def quiet_libraries(quiet: bool) -> None:
    """Our messages at INFO (WARNING with -q), other libraries' from WARNING up: loaders'
    chatter stays off the terminal (faiss logs eight INFO lines about AVX512 on import)."""
    logging.basicConfig(level=logging.WARNING, format="knnlm: %(message)s", stream=sys.stderr)
    logging.getLogger("knnlm").setLevel(logging.WARNING if quiet else logging.INFO)
    logging.getLogger("faiss").setLevel(logging.WARNING)  # also under a root logger set to INFO
    for noisy in ("transformers", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers is first imported;
    # load_lm quiets it again, with its progress bars, once it is imported


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries(args.quiet)
    try:
        args.fn(args)
    except KnnlmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
