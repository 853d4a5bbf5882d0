"""`knnlm build --workers N` (sharded build on Ray) and `knnlm shard` (split a datastore)."""

from __future__ import annotations


def build_on_ray(args, lm, published: bool = False) -> None:
    """The sharded branch of `knnlm build`: shards on N Ray workers, then one index over them
    (`published`: an earlier run published the shards; only the index and tuning are left)."""
    from pathlib import Path

    from knnlm.scale import open_datastore
    from knnlm.scale.build import build_sharded
    from knnlm.scale.index import build_sharded_index

    out = Path(args.output) if published else build_sharded(
        lm, args.corpus, args.output, workers=args.workers, window=args.window, stride=args.stride,
        batch_tokens=args.batch_tokens, overwrite=args.overwrite, ray_address=args.ray_address,
        device=str(lm.device))
    ds = open_datastore(out)
    print(f"datastore {out}: {ds.count} entries in {len(ds.shards)} shards "
          f"({', '.join(str(s.count) for s in ds.shards)}), d={ds.dim}, key point {ds.key_point}")
    if args.index != "none":
        idx = build_sharded_index(ds, args.index, backend="ray" if args.workers > 1 else "local",
                                  ray_address=args.ray_address, overwrite=published, progress=not args.quiet)
        print(f"index {idx}")
        if not args.no_tune:  # as the single-process build: tuned in process, over all shards
            from knnlm.cli.common import print_tuned
            from knnlm.run.selftune import self_tune
            from knnlm.scale import open_searcher

            ds = open_datastore(out)
            print_tuned(self_tune(lm, ds, searcher=open_searcher(ds), sample_tokens=args.tune_tokens,
                                  batch_tokens=args.batch_tokens, progress=not args.quiet))


def cmd_shard(args) -> None:
    from pathlib import Path

    from knnlm.cli.common import finishing
    from knnlm.scale import open_datastore
    from knnlm.scale.index import build_sharded_index
    from knnlm.scale.split import split_datastore

    with finishing(args.output, args.overwrite) as published:  # published: only the index is left
        out = Path(args.output) if published else split_datastore(args.datastore, args.output, args.shards,
                                                                   overwrite=args.overwrite, at=args.at)
        ds = open_datastore(out)
        print(f"datastore {out}: {ds.count} entries in {len(ds.shards)} shards "
              f"({', '.join(str(s.count) for s in ds.shards)})")
        if args.index != "none":
            idx = build_sharded_index(ds, args.index, overwrite=published, progress=not args.quiet)
            print(f"index {idx}")


def register(add) -> None:
    sp = add("shard", cmd_shard, "split a datastore into shards (a copy; the source is only read)",
             "  knnlm shard ds-wiki -o ds-wiki-3 --shards 3 --index Flat\n"
             "  knnlm shard ds-wiki -o ds-wiki-3 --shards 3 --index IVF1024,PQ64\n"
             "  knnlm eval test.txt -d ds-wiki-3 --search-actors 3     # one Ray actor a shard")
    sp.add_argument("datastore", help="a single datastore")
    sp.add_argument("-o", "--output", required=True, help="sharded datastore directory to create")
    sp.add_argument("--shards", type=int, required=True, help="number of shards")
    sp.add_argument("--at", choices=["documents", "entries"], default="documents",
                    help="cut between documents, or at equal entry counts (cutting documents where needed)")
    sp.add_argument("--index", default="auto", help="index over the shards: auto, Flat, a FAISS factory string, none")
    sp.add_argument("--overwrite", action="store_true", help="replace an existing output")
