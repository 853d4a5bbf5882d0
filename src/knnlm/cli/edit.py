"""Datastore edits on the command line (`knnlm remove`, `knnlm compact`) and `knnlm attribute`:
which documents of a datastore a text's probabilities came from."""

from __future__ import annotations

import time
from pathlib import Path

from knnlm.errors import KnnlmError


def cmd_attribute(args) -> None:
    from knnlm.cli.checks import check_text_command
    from knnlm.cli.common import load_lm, searcher_from_args, write_json
    from knnlm.core.batching import plan_files
    from knnlm.core.scoring import check_settings
    from knnlm.core.settings import resolve
    from knnlm.run.evaluate import open_for_model, score_plan
    from knnlm.run.explain import attribute_scores

    check_settings(lam=args.lam, temperature=args.temperature, k=args.k)
    if args.top < 1:
        raise KnnlmError(f"need --top >= 1, got {args.top}")
    check_text_command(args)
    lm = load_lm(args, args.datastore)
    ds = open_for_model(lm, args.datastore)
    r = resolve(ds.meta, ds.count, args.k, args.lam, args.temperature, paper=args.paper_defaults, name=str(ds.path),
                lambda_mode=args.lambda_mode)
    plan = plan_files(lm, args.text, args.window, args.stride, args.batch_tokens)
    s = score_plan(lm, plan, searcher_from_args(args, ds), k=r.k, temperature=r.temperature, keep_neighbors=True,
                   progress=not args.quiet)
    a = attribute_scores(ds, s, r.lam, r.temperature, r.adapt, r.by_distance)
    rows = a.table(ds.doc_info)
    n = len(s.targets)
    print(f"{n} tokens; the datastore carried {a.carried.sum() / n:.1%} of their probability mass, "
          f"{a.to_target.sum() / n:.1%} on the text's own tokens; {len(rows)} documents took part "
          f"(k={r.k}, lambda={r.lam}{' adaptive' if r.adapt else ''}, T={r.temperature})")
    print(render(rows[: args.top], n))
    if args.output:
        write_json(args.output, {"tokens": n, "k": r.k, "lambda": r.lam, "temperature": r.temperature,
                                 "adaptive": r.adapt, "documents": rows})
        print(f"wrote {args.output}")


def render(rows: list[dict], n: int) -> str:
    """The documents' summary as an aligned table: weight in % of the text's tokens."""
    head = f"{'doc':>6} {'weight':>7} {'to text':>7} {'tokens':>6} {'hits':>5}  title (source)"
    lines = [head]
    for r in rows:
        src = f" ({Path(r['source']).name})" if r.get("source") else ""
        lines.append(f"{r['document']:>6} {r['weight'] / n:>7.2%} {r['target_weight'] / n:>7.2%} "
                     f"{r['tokens']:>6} {r['target_tokens']:>5}  {r.get('title', '')[:60]}{src}")
    return "\n".join(lines)


def cmd_remove(args) -> None:
    from knnlm.core.edit import remove_documents, select_documents
    from knnlm.scale.edit import open_for_edit

    ds = open_for_edit(args.datastore)
    decode = None
    if args.text_match is not None:
        decode = _decoder(ds)
    ids = [int(x) for part in args.doc for x in part.split(",") if x.strip()] if args.doc else []
    docs = select_documents(ds, ids, args.title or (), args.source or (), args.match, args.text_match, decode)
    entries = int((ds.docs[docs, 1] - 1).sum())
    if args.dry_run:
        print(f"would remove {len(docs)} documents ({entries} entries) of {ds.path}:")
        for d in docs[:SHOWN]:
            info = ds.doc_info[d]
            print(f"  {d:>6}  {info.get('title', '')[:70]} ({info.get('source', '')}, line {info.get('line', '?')})")
        if len(docs) > SHOWN:
            print(f"  ... and {len(docs) - SHOWN} more")
        return
    e = remove_documents(ds.path, docs)
    print(f"removed {e['count']} documents ({e['entries']} entries) from {ds.path}: version {e['version']}; "
          f"no search returns them now (`knnlm compact {ds.path}` reclaims their space)")


SHOWN = 50  # documents a dry run lists


def _decoder(ds):
    """token ids -> text with the datastore's tokenizer (loaded alone, no model)."""
    from transformers import AutoTokenizer

    from knnlm.core.model import DEFAULT_MODEL

    path = ds.meta["identity"]["model"]
    if path == DEFAULT_MODEL:
        from knnlm.core.assets import ensure_default_model

        path = str(ensure_default_model())
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise KnnlmError(f"cannot load the tokenizer of {path!r}: {str(e).splitlines()[0]}") from None
    return lambda ids: tok.decode([int(i) for i in ids])


def cmd_add(args) -> None:
    from knnlm.cli.checks import check_texts
    from knnlm.cli.common import load_lm, print_tuned
    from knnlm.scale import open_datastore
    from knnlm.scale.edit import add_documents, open_for_edit

    check_texts(args.corpus)
    ds = open_for_edit(args.datastore)
    _not_just_added(ds, args.corpus)
    lm = load_lm(args, args.datastore)
    t0 = time.perf_counter()
    e = add_documents(lm, ds.path, args.corpus, batch_tokens=args.batch_tokens, progress=not args.quiet)
    print(f"added {e['count']} documents ({e['entries']} entries) to {ds.path} in {time.perf_counter() - t0:.1f} s: "
          f"version {e['version']}, {open_datastore(ds.path).count} entries"
          + (f" (a new shard: {e['shard']})" if "shard" in e else ""))
    if args.retune:
        from knnlm.run.selftune import self_tune

        print_tuned(self_tune(lm, open_datastore(ds.path), sample_tokens=args.tune_tokens, progress=not args.quiet))


def _not_just_added(ds, corpora) -> None:
    """The same command run again after it had committed (killed just after, say) would add the
    same documents a second time: refused when the datastore's last edit added these very files."""
    from knnlm.core.corpus import file_sha256

    edits, recorded = ds.meta.get("edits") or [{}], ds.meta.get("corpora", [])
    if edits[-1].get("op") != "add" or len(recorded) < len(corpora):
        return
    if [file_sha256(c) for c in corpora] == [r.get("sha256") for r in recorded[len(recorded) - len(corpora):]]:
        raise KnnlmError(f"{', '.join(map(str, corpora))} already added to {ds.path} by its last edit "
                         f"(version {edits[-1].get('version')}): nothing added")


def cmd_compact(args) -> None:
    from knnlm.scale import open_datastore
    from knnlm.scale.edit import compact

    before = _bytes(args.datastore)
    e = compact(args.datastore)
    after = _bytes(args.datastore)
    print(f"compacted {args.datastore}: {e['documents']} removed documents, {e['entries']} entries dropped, "
          f"{(before - after) / 2**20:.1f} MiB reclaimed; version {e['version']}, "
          f"{open_datastore(args.datastore).count} entries")


def _bytes(path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def register(add, add_model_args, add_knn_args, add_window_args) -> None:
    sp = add("remove", cmd_remove, "remove documents from a datastore: no search returns them from then on",
             "  knnlm remove ds --doc 12 --dry-run            # list what would go\n"
             "  knnlm remove ds --doc 12,13 --title 'Some article'\n"
             "  knnlm remove ds --source private.jsonl         # every document of that corpus file\n"
             "  knnlm remove ds --match '^Draft' --text-match 'do not (copy|train)'   # regular expressions\n"
             "  knnlm compact ds                               # later: rewrite the files without them")
    sp.add_argument("datastore")
    sp.add_argument("--doc", action="append", help="document ids (comma-separated; repeatable)")
    sp.add_argument("--title", action="append", help="exact document title (repeatable)")
    sp.add_argument("--source", action="append", help="corpus file the documents came from (repeatable)")
    sp.add_argument("--match", default=None, metavar="REGEX", help="documents whose title matches")
    sp.add_argument("--text-match", default=None, metavar="REGEX",
                    help="documents whose text matches (reads every document with the datastore's tokenizer)")
    sp.add_argument("--dry-run", action="store_true", help="list the documents that would go; change nothing")

    sp = add("add", cmd_add, "add documents to a datastore: one forward pass over them, no index retraining",
             "  knnlm add ds-wiki more.jsonl\n"
             "  knnlm add ds-wiki new-articles.jsonl --retune   # and tune k, lambda, T again on the grown corpus\n"
             "  (the datastore's model, window and stride; its indexes take the new keys as they are trained;\n"
             "   a sharded datastore gets them as a new shard; interrupted, the datastore stays as it was:\n"
             "   run the same command again)")
    sp.add_argument("datastore")
    sp.add_argument("corpus", nargs="+", help=".txt or .jsonl files (or their .gz)")
    sp.add_argument("--retune", action="store_true",
                    help="tune k, lambda and T again on the datastore's corpus after adding (leave-own-document-out)")
    sp.add_argument("--tune-tokens", type=int, default=16384, help="with --retune: positions of the corpus read")
    sp.add_argument("--batch-tokens", type=int, default=4096, help="padded tokens per forward pass")
    add_model_args(sp)

    sp = add("compact", cmd_compact, "rewrite a datastore and its indexes without its removed documents",
             "  knnlm compact ds\n"
             "  (an IVF index keeps its training and takes the remaining keys again; entry ids change;\n"
             "   a sharded datastore: each shard that held removed documents is rewritten)")
    sp.add_argument("datastore")

    sp = add("attribute", cmd_attribute, "which documents of the datastore a text's probabilities came from",
             "  knnlm attribute article.txt -d ds-wiki\n"
             "  knnlm attribute article.txt -d ds-wiki --top 50 -o attribution.json\n"
             "  (weight: the share of the kNN-LM's probability mass the document's entries carried, summed over\n"
             "   the text's tokens; to text: the part of it on the tokens the text has; tokens: positions where\n"
             "   the document was among the neighbours; hits: where one of its entries predicted the token)")
    sp.add_argument("text", nargs="+", help=".txt or .jsonl files (or their .gz)")
    sp.add_argument("--top", type=int, default=20, help="documents shown")
    sp.add_argument("-o", "--output", help="write every document's summary as JSON")
    add_knn_args(sp)
    add_model_args(sp)
    add_window_args(sp)
