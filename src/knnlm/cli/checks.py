"""What a command can check without a model, checked before the model loads.

Each `knnlm` command calls these first, so a missing file, a wrong datastore or index,
or a setting out of range ends in one `error:` line in a fraction of a second, not after
seconds of loading a model and FAISS.  Nothing here imports torch, transformers or faiss.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from knnlm.core.batching import check_windows
from knnlm.core.corpus import read_documents
from knnlm.core.index import index_info
from knnlm.core.scoring import check_cache_settings, check_settings
from knnlm.errors import KnnlmError
from knnlm.retrieval.device import INDEX_NAME as DEVICE_INDEX


def check_texts(paths: Sequence[str | Path]) -> None:
    """Every text file exists and reads as documents (UTF-8, valid JSONL, not empty)."""
    for p in paths:
        read_documents(p)


def check_window_args(args) -> None:
    check_windows(args.window, args.stride)
    if args.batch_tokens < 1:
        raise KnnlmError(f"--batch-tokens must be >= 1, got {args.batch_tokens}")


def check_knn_args(args) -> None:
    """-k, --lambda, --temperature, --nprobe and the cache options, where the command has them
    (None: not given, the datastore's or the library's default applies)."""
    check_settings(lam=getattr(args, "lam", None), temperature=getattr(args, "temperature", None),
                   k=getattr(args, "k", None))
    if getattr(args, "nprobe", None) is not None and args.nprobe < 1:
        raise KnnlmError(f"--nprobe must be >= 1, got {args.nprobe}")
    if getattr(args, "cache_lambda", None) is not None:
        check_cache_settings(lam=args.cache_lambda, theta=args.cache_theta, size=args.cache_size)


def check_datastore(path: str | Path, index: str | None = None, k: int | None = None,
                    name: str | None = None):
    """The datastore opened (files present, shapes right; a sharded one by its manifest), the
    index of a single one found (the only one, or `index`) and belonging to it, and `k` no
    larger than its entries."""
    from knnlm.scale import ShardedDatastore, open_datastore

    ds = open_datastore(path)
    if not isinstance(ds, ShardedDatastore) and index != DEVICE_INDEX:  # the device searcher needs no index files
        index_info(ds, index)
    if k is not None and k > ds.count:
        where = f"datastore {name!r}" if name else "the datastore"
        raise KnnlmError(f"k={k} is larger than {where} ({ds.count} entries)")
    return ds


def check_output(path: str | Path | None) -> None:
    """An output file can be written there (its folder is created when it is written)."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise KnnlmError(f"output is a directory, expected a file name: {p}")
    parent = next((q for q in p.absolute().parents if q.exists()), None)
    if parent is not None and not parent.is_dir():
        raise KnnlmError(f"cannot write {p}: {parent} is a file, not a folder")


def check_text_command(args, datastore_needed: bool = True) -> None:
    """What `eval`, `tune` and `explain` share, checked before the model loads: the texts,
    windows, retrieval settings, output file and (when given, or `datastore_needed`) the datastore."""
    check_texts(args.text)
    check_window_args(args)
    check_knn_args(args)
    check_output(args.output)
    if datastore_needed and not args.datastore:
        raise KnnlmError(f"`knnlm {args.command}` needs a datastore: -d DIR (from `knnlm build`)")
    if args.datastore:
        check_datastore(args.datastore, args.index, args.k)


def check_memories(paths) -> None:
    """Each memory decoder directory (`knnlm memory train`) exists and has readable metadata."""
    from knnlm.memory.decoder import read_meta

    for path in paths:
        read_meta(path)
