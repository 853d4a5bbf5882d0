"""`knnlm reduce`: a smaller copy of a datastore (PCA-reduced keys, or near-duplicates merged)."""

from __future__ import annotations

from knnlm.errors import KnnlmError


def cmd_reduce(args) -> None:
    from pathlib import Path

    from knnlm.cli.common import finishing
    from knnlm.core.datastore import Datastore
    from knnlm.core.index import build_index
    from knnlm.retrieval.reduce import bytes_per_entry, prune_datastore, reduce_datastore

    if (args.pca is None) == (args.prune is None):
        raise KnnlmError("give exactly one of --pca DIM and --prune RADIUS")
    ds = Datastore(args.datastore)
    with finishing(args.output, args.overwrite) as published:  # published: only the index is left
        if published:
            out = Path(args.output)
        elif args.pca is not None:
            out = reduce_datastore(ds, args.output, args.pca, sample=args.sample, overwrite=args.overwrite)
        else:
            out = prune_datastore(ds, args.output, args.prune, overwrite=args.overwrite)
        small = Datastore(out)
        print(f"datastore {out}: {small.count} entries, d={small.dim} "
              f"({bytes_per_entry(small)['total']:.1f} bytes/entry of keys and values, "
              f"was {bytes_per_entry(ds)['total']:.1f})")
        if args.index != "none":
            print(f"index {build_index(small, args.index, overwrite=published, progress=not args.quiet)}")


def register(add) -> None:
    sp = add("reduce", cmd_reduce, "a smaller copy of a datastore: PCA-reduced keys or merged near-duplicates",
             "  knnlm reduce ds-wiki -o ds-wiki-pca144 --pca 144        # keys 576 -> 144 dimensions\n"
             "  knnlm reduce ds-wiki -o ds-wiki-pruned --prune 2.0      # merge same-value keys within d^2 <= 2\n"
             "  knnlm eval wiki.test.raw -d ds-wiki-pca144             # queries are reduced to match")
    sp.add_argument("datastore", help="the source datastore (left unchanged)")
    sp.add_argument("-o", "--output", required=True, help="directory of the new datastore")
    sp.add_argument("--pca", type=int, default=None, metavar="DIM", help="reduce the keys to DIM dimensions")
    sp.add_argument("--sample", type=int, default=200_000, help="keys the PCA is fitted on")
    sp.add_argument("--prune", type=float, default=None, metavar="RADIUS",
                    help="merge entries with the same value whose keys are within squared L2 RADIUS (weighted by count)")
    sp.add_argument("--index", default="auto", help="index to build after: auto, Flat, a FAISS factory string, none")
    sp.add_argument("--overwrite", action="store_true", help="replace an existing output")
