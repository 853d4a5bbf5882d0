"""`knnlm memory targets|train`: a memory decoder (Cao et al., 2025) from a datastore."""

from __future__ import annotations

import argparse
import logging

from knnlm.cli.common import Formatter, load_lm, table
from knnlm.errors import KnnlmError

LOG = logging.getLogger("knnlm")


def cmd_targets(args) -> None:
    from knnlm.memory.targets import Targets, build_targets

    out = build_targets(args.datastore, args.output, k=args.k, temperature=args.temperature, keep=args.keep,
                        exclude=args.exclude, index=args.index, nprobe=args.nprobe,
                        rerank=False if args.no_rerank else None, chunk=args.chunk, limit=args.limit,
                        overwrite=args.overwrite, progress=not args.quiet)
    t = Targets(out)
    m = t.meta
    print(table([("targets", str(out)), ("positions", str(t.count)),
                 ("settings", f"k={m['k']} T={m['temperature']} keep={m['keep']} exclude={m['exclude']}"),
                 ("mean kept mass", f"{m['mean_kept_mass']:.4f}"), ("seconds", str(m["seconds"]))]))


def cmd_train(args) -> None:
    from knnlm.memory.train import TrainConfig, train_decoder

    cfg = TrainConfig(alpha=args.alpha, lr=args.lr, epochs=args.epochs, max_steps=args.max_steps,
                      batch_size=args.batch_size, seq_len=args.seq_len, heldout=args.heldout,
                      eval_every=args.eval_every, patience=args.patience, save_every=args.save_every,
                      seed=args.seed, autocast=args.autocast)  # checked before the model loads
    if args.layers < 1:
        raise KnnlmError(f"--layers must be >= 1, got {args.layers}")
    lm = load_lm(args, args.datastore)
    out = train_decoder(lm, args.datastore, args.targets, args.output, layers=args.layers,
                        init_model=args.init_model, config=cfg, overwrite=args.overwrite, progress=not args.quiet)
    from knnlm.memory.decoder import read_meta

    m = read_meta(out)
    print(table([("memory decoder", str(out)), ("init", f"{m['init']} (L={m['layers']})"),
                 ("steps", f"{m['steps']} (best at {m['best_step']})"),
                 ("train loss first/last", f"{m['first_train']['loss']:.4f} / {m['last_train']['loss']:.4f}"),
                 ("held-out loss", "-" if m["heldout"] is None else f"{m['heldout']['loss']:.4f} "
                  f"(kl {m['heldout']['kl']:.4f}, ce {m['heldout']['ce']:.4f})"),
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

    def add(name, fn, help, epilog):
        sp = msub.add_parser(name, help=help, description=help, epilog="examples:\n" + epilog,
                             formatter_class=Formatter)
        sp.set_defaults(fn=fn)
        sp.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress bars or info messages")
        return sp

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
             "  (Ctrl-C keeps a checkpoint; the same command resumes it)")
    sp.add_argument("datastore", help="the datastore the targets were computed from")
    sp.add_argument("--targets", required=True, help="targets directory (from `knnlm memory targets`)")
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
    sp.add_argument("--eval-every", type=int, default=None, help="steps between held-out losses (default: an epoch)")
    sp.add_argument("--patience", type=int, default=3, help="held-out losses without improvement before stopping")
    sp.add_argument("--save-every", type=int, default=50, help="steps between checkpoints")
    sp.add_argument("--seed", type=int, default=0, help="seed of the data order and held-out split")
    sp.add_argument("--autocast", choices=["none", "bfloat16"], default="none", help="mixed precision")
    sp.add_argument("--overwrite", action="store_true", help="replace an existing decoder")
    add_model_args(sp)
