"""`knnlm memory targets|train`: a memory decoder (Cao et al., 2025) from a datastore."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from knnlm.cli.common import Formatter, load_lm, numbers, searcher_from_args, subcommand_adder, table, write_json
from knnlm.errors import KnnlmError

LOG = logging.getLogger("knnlm")


def cmd_targets(args) -> None:
    from knnlm.memory.targets import Targets, TargetSettings, build_targets
    from knnlm.run.options import RetrievalSettings

    retrieval = RetrievalSettings(k=args.k, temperature=args.temperature, index=args.index, nprobe=args.nprobe,
                                  rerank=False if args.no_rerank else None)
    out = build_targets(args.datastore, args.output, TargetSettings(args.keep, args.exclude, chunk=args.chunk),
                        retrieval=retrieval, limit=args.limit, overwrite=args.overwrite, progress=not args.quiet)
    t = Targets(out)
    m = t.meta
    print(table([("targets", str(out)), ("positions", str(t.count)),
                 ("settings", f"k={m['k']} T={m['temperature']} keep={m['keep']} exclude={m['exclude']}"),
                 ("mean kept mass", f"{m['mean_kept_mass']:.4f}"), ("seconds", str(m["seconds"]))]))


def cmd_train(args) -> None:
    from knnlm.memory.train import TrainConfig, train_decoder

    cfg = TrainConfig(alpha=args.alpha, lr=args.lr, epochs=args.epochs, max_steps=args.max_steps,
                      batch_size=args.batch_size, seq_len=args.seq_len, heldout=args.heldout,
                      heldout_unit=args.heldout_unit,
                      max_seconds=None if args.max_minutes is None else 60 * args.max_minutes,
                      eval_every=args.eval_every, patience=args.patience, save_every=args.save_every,
                      seed=args.seed, autocast=args.autocast, keep=args.keep_weights,
                      until_train_loss=args.until_train_loss)  # checked before the model loads
    if args.layers < 1:
        raise KnnlmError(f"--layers must be >= 1, got {args.layers}")
    lm = load_lm(args, args.datastore)
    out = train_decoder(lm, args.datastore, args.targets, args.output, layers=args.layers,
                        init_model=args.init_model, config=cfg, overwrite=args.overwrite, progress=not args.quiet)
    from knnlm.memory.decoder import read_meta

    m = read_meta(out)
    print(table([("memory decoder", str(out)), ("init", f"{m['init']} (L={m['layers']})"),
                 ("steps", f"{m['steps']} (best at {m['best_step']}; kept: {m.get('kept', 'best')}, "
                           f"stopped: {m['stopped']})"),
                 ("train loss first/last", f"{m['first_train']['loss']:.4f} / {m['last_train']['loss']:.4f}"),
                 ("held-out loss", "-" if m["heldout"] is None else f"{m['heldout']['loss']:.4f} "
                  f"(kl {m['heldout']['kl']:.4f}, ce {m['heldout']['ce']:.4f})"),
                 ("lambda", "- (nothing held out: commands use 0.25, adapting)" if not m.get("settings") else
                  f"{m['settings']['lambda']} (tuned on {m['settings']['tokens']} held-out tokens: ppl "
                  f"{m['settings']['ppl_lm']:.3f} -> {m['settings']['ppl_memory']:.3f}; adapts to each text)"),
                 ("seconds", str(m["seconds"]))]))


def register(sub, add_model_args) -> None:
    """Add `memory` (with `targets` and `train`) to the knnlm parser."""
    from knnlm.memory.loss import DEFAULT_ALPHA, DEFAULT_K, DEFAULT_KEEP, DEFAULT_TEMPERATURE

    mp = sub.add_parser("memory", help="a memory decoder: a small LM trained to imitate a datastore",
                        description="Memory Decoder (Cao et al., 2025): train a small decoder to imitate the "
                                    "kNN-LM's p_kNN on the datastore's own text; then eval/generate/serve mix it "
                                    "with the LM (--memory) and no search runs.",
                        formatter_class=Formatter,
                        epilog="examples:\n"
                               "  knnlm memory targets ds -o ds-targets\n"
                               "  knnlm memory train ds --targets ds-targets -o mem --layers 2\n"
                               "  knnlm eval test.txt --memory mem --memory-lambda 0.3")
    msub = mp.add_subparsers(dest="memory_command", required=True, metavar="COMMAND")

    add = subcommand_adder(msub)

    sp = add("targets", cmd_targets, "p_kNN of every position of a datastore's corpus, without its own memories",
             "  knnlm memory targets ds-wiki -o ds-wiki-targets                # k=1024, T=16, own document out\n"
             "  knnlm memory targets ds-wiki -o t --exclude radius:4096 -k 256 # +-4096 entries of the same document\n"
             "  knnlm memory targets ds -o t --exclude self --keep 32 --limit 100000\n"
             "  (an interrupted run resumes when the same command runs again)")
    sp.add_argument("datastore", help="datastore directory (from `knnlm build`, with its corpus tokens)")
    sp.add_argument("-o", "--output", required=True, help="targets directory to create")
    sp.add_argument("-k", "--k", type=int, default=DEFAULT_K, help="neighbours per position")
    sp.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, help="kNN softmax temperature")
    sp.add_argument("--keep", type=int, default=DEFAULT_KEEP, help="most likely tokens of p_kNN stored per position")
    sp.add_argument("--exclude", default="document",
                    help="left out of a position's neighbours: 'document' (its own; inside a long one, the "
                         "entries within 2048), 'self' (the entry only), 'radius:N' (same document, within N)")
    sp.add_argument("--index", default=None, help="index name inside the datastore (default: its only index)")
    sp.add_argument("--nprobe", type=int, default=None, help="IVF lists probed (default: the index's)")
    sp.add_argument("--no-rerank", action="store_true", help="keep approximate (PQ) distances")
    sp.add_argument("--chunk", type=int, default=2048, help="positions searched at a time (bounds memory)")
    sp.add_argument("--limit", type=int, default=None, help="only the first N positions")
    sp.add_argument("--overwrite", action="store_true", help="replace an existing targets directory")

    sp = add("train", cmd_train, "train a memory decoder on a datastore's corpus and its p_kNN targets",
             "  knnlm memory train ds-wiki --targets ds-wiki-targets -o mem-wiki            # L=2 copy of the LM\n"
             "  knnlm memory train ds --targets t -o mem --layers 4 --epochs 2 --alpha 0.5 --autocast bfloat16\n"
             "  knnlm memory train ds --targets t -o mem --init-model HuggingFaceTB/SmolLM2-135M  # same tokenizer\n"
             "  knnlm memory train ds -o memorised --alpha 0 --layers 30 --keep-weights last --until-train-loss 0.1\n"
             "      # the whole LM fine-tuned on the corpus (CE only: no targets), final weights\n"
             "  (Ctrl-C keeps a checkpoint; the same command resumes it)")
    sp.add_argument("datastore", help="the datastore the targets were computed from")
    sp.add_argument("--targets", default=None,
                    help="targets directory (from `knnlm memory targets`); not needed with --alpha 0 (CE only)")
    sp.add_argument("-o", "--output", required=True, help="decoder directory to create (an HF model + memory.json)")
    sp.add_argument("--layers", "-L", type=int, default=2, help="decoder layers kept from the LM")
    sp.add_argument("--init-model", default=None, help="start from this HF model (id or path) instead of a copy")
    sp.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="weight of KL(p_kNN || p_mem) vs CE")
    sp.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    sp.add_argument("--epochs", type=int, default=1, help="passes over the corpus")
    sp.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    sp.add_argument("--batch-size", type=int, default=8, help="pieces per step")
    sp.add_argument("--seq-len", type=int, default=256, help="tokens per piece")
    sp.add_argument("--heldout", type=float, default=0.02, help="share of pieces held out for early stopping")
    sp.add_argument("--heldout-unit", choices=["piece", "document"], default="piece",
                    help="hold out pieces, or whole documents (text never trained on, e.g. to tune lambda on)")
    sp.add_argument("--max-minutes", type=float, default=None,
                    help="training time budget; the best weights so far are the result (a resumed run counts "
                         "from its start)")
    sp.add_argument("--eval-every", type=int, default=None, help="steps between held-out losses (default: an epoch)")
    sp.add_argument("--patience", type=int, default=3, help="held-out losses without improvement before stopping")
    sp.add_argument("--save-every", type=int, default=50, help="steps between checkpoints")
    sp.add_argument("--seed", type=int, default=0, help="seed of the data order and held-out split")
    sp.add_argument("--autocast", choices=["none", "bfloat16"], default="none", help="mixed precision")
    sp.add_argument("--keep-weights", choices=["best", "last"], default="best",
                    help="the best held-out weights (early stopping), or the final ones (no early stopping)")
    sp.add_argument("--until-train-loss", type=float, default=None,
                    help="stop after the first epoch whose mean train loss is below this")
    sp.add_argument("--overwrite", action="store_true", help="replace an existing decoder")
    add_model_args(sp)


# ---- --memory on eval, tune, explain, generate, serve ------------------------------------
def add_memory_args(p: argparse.ArgumentParser, serve: bool = False) -> None:
    from knnlm.memory.mix import DEFAULT_MEMORY_LAMBDA

    g = p.add_argument_group("memory decoder (`knnlm memory train`): mixed on top, no search")
    if serve:
        g.add_argument("--memory", type=_spec, action="append", metavar="NAME=PATH",
                       help="a memory decoder served under NAME (repeatable); requests pick one with \"memory\"")
        g.add_argument("--default-memory", default=None,
                       help="memory decoder of requests that name none (default: the first; 'none': none)")
    else:
        g.add_argument("--memory", default=None, help="memory decoder directory")
    g.add_argument("--memory-lambda", type=float, default=None,
                   help="weight of p_mem: p = l p_mem + (1-l) p_(kNN-)LM (default: the lambda the decoder tuned on "
                        f"its held-out text when trained, adapting to the text; else {DEFAULT_MEMORY_LAMBDA})")


def _spec(spec: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {spec!r}")
    return name, path


def memories(args) -> dict:
    """{name: path} of the --memory options of generate (one path) or serve (NAME=PATH)."""
    from knnlm.memory.mix import check_memory_lambda

    check_memory_lambda(args.memory_lambda)
    if not args.memory:
        return {}
    if isinstance(args.memory, str):
        return {Path(args.memory).name: args.memory}
    out = dict(args.memory)
    if len(out) != len(args.memory):
        raise KnnlmError("each --memory NAME must be different")
    return out


def cmd_tune_memory(args) -> None:
    """`knnlm tune --memory`: the memory lambda over the LM (and over the best kNN-LM with -d)."""
    from knnlm.core.batching import plan_files
    from knnlm.core.scoring import interpolate, knn_target_logprobs
    from knnlm.memory.decoder import MemoryDecoder
    from knnlm.memory.mix import MEMORY_LAMBDAS, check_memory_lambda, sweep_memory
    from knnlm.run.evaluate import open_for_model, score_plan
    from knnlm.run.options import RetrievalSettings
    from knnlm.run.tune import DEFAULT_LAMBDAS, DEFAULT_TEMPERATURES, sweep

    lambdas = numbers(args.lambdas, float, "--lambdas")
    for lam in lambdas or []:
        check_memory_lambda(lam)
    lm = load_lm(args, args.datastore, memory=args.memory)
    searcher = None
    if args.datastore:
        ds = open_for_model(lm, args.datastore)
        searcher = searcher_from_args(args, ds)
    mem = MemoryDecoder.load_for(lm, args.memory)
    plan = plan_files(lm, args.text, args.window, args.stride, args.batch_tokens)
    k = args.k or (min(1024, searcher.ds.count) if searcher else 1)
    s = score_plan(lm, plan, searcher, mem, retrieval=RetrievalSettings(k=k), keep_neighbors=searcher is not None,
                   progress=not args.quiet)
    res = {"memory": str(mem.path), "texts": args.text, "model": lm.name, "tokens": int(plan.count),
           "lm": sweep_memory(s.lm, s.memory, lambdas or MEMORY_LAMBDAS)}
    rows = [("tokens", str(res["tokens"])), ("ppl LM", f"{res['lm']['ppl_base']:.3f}"),
            ("best ppl LM + memory", f"{res['lm']['best']['ppl']:.3f} (memory lambda={res['lm']['best']['lambda']})")]
    if searcher is not None:
        knn = sweep(s.lm, s.dists, s.vals, s.targets, lambdas or DEFAULT_LAMBDAS, DEFAULT_TEMPERATURES)
        b = knn["best"]
        base = interpolate(s.lm, knn_target_logprobs(s.dists[:, : b["k"]], s.vals[:, : b["k"]], s.targets,
                                                     b["temperature"]), b["lambda"])
        res.update(knn=knn, knn_memory=sweep_memory(base, s.memory, lambdas or MEMORY_LAMBDAS))
        rows += [("best ppl kNN-LM", f"{b['ppl']:.3f} (k={b['k']} lambda={b['lambda']} T={b['temperature']})"),
                 ("best ppl kNN-LM + memory", f"{res['knn_memory']['best']['ppl']:.3f} "
                                              f"(memory lambda={res['knn_memory']['best']['lambda']})")]
    print(table(rows))
    write_json(args.output, res)
    print(f"wrote {args.output}")


def cmd_explain_memory(args) -> None:
    """`knnlm explain --memory`: the tokens where the decoder moved the LM's probability most."""
    from knnlm.core.batching import plan_files
    from knnlm.core.settings import resolve
    from knnlm.memory.decoder import MemoryDecoder
    from knnlm.memory.mix import check_memory_lambda, disagreements, memory_weight
    from knnlm.run.evaluate import open_for_model, score_plan
    from knnlm.run.options import RetrievalSettings

    check_memory_lambda(args.memory_lambda)
    lm = load_lm(args, args.datastore, memory=args.memory)
    searcher, r = None, None
    if args.datastore:
        ds = open_for_model(lm, args.datastore)
        r = resolve(ds.meta, ds.count, args.k, args.lam, args.temperature, paper=args.paper_defaults,
                    name=str(ds.path))
        searcher = searcher_from_args(args, ds)
    mem = MemoryDecoder.load_for(lm, args.memory)
    plan = plan_files(lm, args.text, args.window, args.stride, args.batch_tokens)
    s = score_plan(lm, plan, searcher, mem, retrieval=RetrievalSettings(k=r.k, temperature=r.temperature) if r else None,
                   progress=not args.quiet)
    mlam = memory_weight(mem.meta, args.memory_lambda, None, str(mem.path)).lam
    items = disagreements(s.lm, s.memory, s.knn, mlam, r.lam if r else 0.0, args.top)
    lines = ["| context | token | p_LM | " + ("p_kNN-LM | " if searcher else "") + "p_mem | p_LM+mem |",
             "|---|---|---:|" + ("---:|" if searcher else "") + "---:|---:|"]
    for it in items:
        i = it["position"]
        doc = int(plan.doc_of(i))
        start, off = int(plan.docs[doc, 0]), i - int(plan.docs[doc, 2]) + 1  # the target is token `off` of `doc`
        before = plan.tokens[start + max(1, off - 12) : start + off]
        it.update(context=lm.decode(before), target=lm.decode([s.targets[i]]))
        cells = [it["context"].replace("\n", "\\n").replace("|", "\\|")[-60:], repr(it["target"]),
                 f"{it['p_lm']:.4f}"] + ([f"{it['p_knnlm']:.4f}"] if searcher else []) + [
                 f"{it['p_mem']:.4f}", f"{it['p_mix']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    print("\n".join(lines))
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(lines) + "\n", encoding="utf-8")
        write_json(out.with_suffix(".json"), items)
        print(f"wrote {out} and {out.with_suffix('.json')}")
