"""Split an existing datastore into shards (a copy: the source is only read).

Each shard holds a run of the source's entries with their tokens and document table,
in today's format; concatenated in order they are the source, entry for entry, so a
sharded search can be compared with the unsharded one.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path

import numpy as np

from knnlm.core.corpus import file_sha256
from knnlm.core.datastore import _FILES, KEY_DTYPE, Datastore, publish, write_json_atomic
from knnlm.errors import KnnlmError
from knnlm.scale.manifest import write_manifest


def document_cuts(entry_starts: np.ndarray, count: int, shards: int) -> list[int]:
    """Document boundaries that split `count` entries into `shards` nearly equal parts.

    entry_starts (D,) is each document's first entry.  Returns shards+1 document
    indices, first 0 and last D; each cut is the document start nearest its equal share,
    and no shard is empty.  Example: entry_starts [0, 10, 20, 30], count 40, 2 shards
    -> [0, 2, 4].
    """
    n_docs = len(entry_starts)
    if not 1 <= shards <= n_docs:
        raise KnnlmError(f"cannot split {n_docs} documents into {shards} shards")
    cuts = [0]
    for s in range(1, shards):
        d = int(np.argmin(np.abs(entry_starts - s * count / shards)))
        cuts.append(min(max(d, cuts[-1] + 1), n_docs - (shards - s)))
    cuts.append(n_docs)
    return cuts


def _part(ds: Datastore, d: int, a: int, b: int) -> tuple[np.ndarray, dict, int]:
    """Entries a..b-1 (global) of document d: its tokens (the keys' contexts and the values),
    its document-table info, and the entry offset of the part inside the document."""
    t0, e0 = int(ds.docs[d, 0]), int(ds.docs[d, 2])
    info = dict(ds.doc_info[d])
    if a > e0 or b < e0 + int(ds.docs[d, 1]) - 1:
        info["split_offset"] = a - e0  # a piece of a document cut between shards
    return np.asarray(ds.tokens[t0 + a - e0 : t0 + b - e0 + 1]), info, a - e0


def split_datastore(src: str | Path, out: str | Path, shards: int, overwrite: bool = False,
                    at: str = "documents", chunk: int = 1 << 16) -> Path:
    """Write `out` (manifest + shards/NNNNN) holding `src`'s entries in `shards` shards.

    `at="documents"` cuts between documents; `at="entries"` cuts at equal entry counts,
    splitting a document where a cut falls inside it (each piece becomes a document of
    its shard, with `split_offset` in its info; the keys are the source's, computed with
    the whole document as context, so searches equal the unsharded datastore's).
    """
    ds = Datastore(src)
    if ds.pruning or ds.reduction:
        raise KnnlmError(f"{ds.path} is pruned or reduced: split the datastore it was made from, then reduce")
    out = Path(out)
    if out.exists() and not overwrite:
        raise KnnlmError(f"{out} already exists (use --overwrite to replace it)")
    if at not in ("documents", "entries"):
        raise KnnlmError(f"split at documents or entries, not {at!r}")
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    (partial / "shards").mkdir(parents=True)
    starts = np.asarray(ds.docs[:, 2])
    if at == "documents":
        cuts = [int(starts[d]) if d < len(starts) else ds.count for d in document_cuts(starts, ds.count, shards)]
    else:
        if not 1 <= shards <= ds.count:
            raise KnnlmError(f"cannot split {ds.count} entries into {shards} shards")
        cuts = [round(s * ds.count / shards) for s in range(shards + 1)]
    paths = []
    for s in range(shards):
        e0, e1 = cuts[s], cuts[s + 1]
        d0, d1 = int(ds.document_of(np.array([e0]))[0]), int(ds.document_of(np.array([e1 - 1]))[0]) + 1
        p = partial / "shards" / f"{s:05d}"
        p.mkdir()
        keys = np.lib.format.open_memmap(p / "keys.npy", mode="w+", dtype=KEY_DTYPE, shape=(e1 - e0, ds.dim))
        for a in range(e0, e1, chunk):  # never the whole keys in memory
            keys[a - e0 : min(a + chunk, e1) - e0] = ds.keys[a : min(a + chunk, e1)]
        keys.flush()
        del keys
        np.save(p / "vals.npy", np.asarray(ds.vals[e0:e1]))
        tokens, infos, table = [], [], np.zeros((d1 - d0, 3), dtype=np.int64)  # token start, count, first entry
        t, e = 0, 0
        for i, d in enumerate(range(d0, d1)):
            a = max(e0, int(ds.docs[d, 2]))
            b = min(e1, int(ds.docs[d, 2]) + int(ds.docs[d, 1]) - 1)
            toks, info, _ = _part(ds, d, a, b)
            table[i] = (t, len(toks), e)
            tokens.append(toks)
            infos.append(info)
            t, e = t + len(toks), e + b - a
        np.save(p / "tokens.npy", np.concatenate(tokens).astype(np.int32))
        np.save(p / "docs.npy", table)
        (p / "docs.jsonl").write_text("".join(json.dumps(i) + "\n" for i in infos), encoding="utf-8")
        meta = {**ds.meta, "id": uuid.uuid4().hex, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "count": e1 - e0, "documents": d1 - d0, "split_from": {"id": ds.id, "entries": [e0, e1]},
                "sha256": {name: file_sha256(p / name) for name in _FILES}}
        write_json_atomic(p / "meta.json", meta)
        paths.append(p)
    write_manifest(partial, paths, extra={"split_from": ds.id, **({"settings": ds.settings} if ds.settings else {})})
    publish(partial, out)
    return out
