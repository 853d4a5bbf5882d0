"""`knnlm attribute`: which documents of a datastore a text's probabilities came from."""

from __future__ import annotations

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
    a = attribute_scores(ds, s, r.lam, r.temperature, r.adapt)
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


def register(add, add_model_args, add_knn_args, add_window_args) -> None:
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
