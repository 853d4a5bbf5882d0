"""Corrupted files: a flipped byte (in a file's header, its middle, its last byte), a file
cut in half, and metadata with an unknown format version, in each file of a datastore, a
sharded datastore (a shard's files and the manifest), an index and a memory decoder.

Expected of each: `knnlm info PATH --verify` fails with one `error:` line naming the
file, never a traceback; and opening (what every command does first) either fails the
same way or, where corruption cannot be seen without reading every byte (the arrays' and
weights' data), is caught by --verify's checksums.  docs/reliability.md tabulates which.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_scale import SETTINGS

from knnlm.cli.main import main
from knnlm.core.datastore import Datastore, build_datastore
from knnlm.core.index import Searcher, build_index
from knnlm.errors import KnnlmError
from knnlm.memory.decoder import MemoryDecoder, init_decoder, save_decoder
from knnlm.scale import open_datastore, open_searcher
from knnlm.scale.index import build_sharded_index
from knnlm.scale.split import split_datastore

HOW = ("flip-head", "flip-middle", "flip-last", "truncate")
VERSIONED = {"meta.json": "format_version", "index.json": "format_version", "manifest.json": "format_version",
             "memory.json": "format_version"}


@pytest.fixture(scope="module")
def artifacts(lm, jsonl_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("corrupt")
    ds = root / "ds"
    build_datastore(lm, [jsonl_corpus], ds, progress=False, **SETTINGS)
    build_index(Datastore(ds), "Flat", progress=False)
    sharded = split_datastore(ds, root / "sharded", 2)
    build_sharded_index(open_datastore(sharded), "Flat", progress=False)
    model, tok, how = init_decoder(lm, 1)
    mem = save_decoder(model, tok, root / "mem", {"base_model": lm.name, "tokenizer_fingerprint":
                                                  lm.tokenizer_fingerprint, **how})
    return {"datastore": ds, "sharded": sharded, "decoder": mem}


def files_of(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def corrupt(f: Path, how: str) -> None:
    b = bytearray(f.read_bytes())
    if how == "truncate":
        b = b[: len(b) // 2]
    elif how == "version":
        meta = json.loads(b)
        meta[VERSIONED[f.name]] = 99
        b = json.dumps(meta).encode()
    else:
        i = {"flip-head": min(8, len(b) - 1), "flip-middle": len(b) // 2, "flip-last": len(b) - 1}[how]
        b[i] ^= 0xFF
    f.write_bytes(bytes(b))


def opens(kind: str, path: Path, lm) -> str | None:
    """What a command does first with this artifact: None if it reads cleanly, else the
    error (only KnnlmError is allowed out)."""
    try:
        if kind == "decoder":
            MemoryDecoder.load(path)
        else:
            ds = open_datastore(path)
            s = open_searcher(ds) if kind == "sharded" else Searcher(ds)
            s.search(np.asarray(ds.keys[:2], dtype=np.float32), 2)
    except KnnlmError as e:
        return str(e)
    return None


def cases():
    """(artifact, file, how) for every file of every artifact (listed from a tiny build
    of each: the file names are fixed by the formats)."""
    ds_files = ["docs.jsonl", "docs.npy", "indexes/flat/index.faiss", "indexes/flat/index.json", "keys.npy",
                "meta.json", "tokens.npy", "vals.npy"]
    sharded_files = ["manifest.json", "indexes/flat/index.json", *(f"shards/00001/{f}" for f in ds_files)]
    for kind, files in (("datastore", ds_files), ("sharded", sharded_files), ("decoder", None)):
        for f in files or ["memory.json", "config.json", "model.safetensors", "tokenizer.json",
                           "tokenizer_config.json"]:
            for how in HOW + (("version",) if Path(f).name in VERSIONED else ()):
                yield kind, f, how


@pytest.mark.parametrize("kind, name, how", list(cases()))
def test_corruption_is_named_never_a_crash(artifacts, lm, kind, name, how, tmp_path, capsys):
    src = artifacts[kind]
    assert name in files_of(src)  # (the matrix covers the format's real files)
    path = shutil.copytree(src, tmp_path / src.name)
    corrupt(path / name, how)
    at_open = opens(kind, path, lm)
    capsys.readouterr()
    code = main(["info", str(path), "--verify"])
    out, err = capsys.readouterr()
    assert code == 1, f"--verify passed a corrupted {name}: {out}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    named = lines[0]
    shown = Path(name).name if not name.startswith("shards/") else None
    if shown is not None and not (kind == "sharded" and name == "indexes/flat/index.json"):
        assert shown in named, f"the error does not name {name}: {named}"
    if at_open is not None:
        assert "\n" not in at_open


def test_all_files_of_each_artifact_are_in_the_matrix(artifacts):
    listed = {(k, f) for k, f, _ in cases()}
    for kind, root in artifacts.items():
        for f in files_of(root):
            if kind == "sharded" and f.startswith("shards/00000/"):
                continue  # shard 0 is the same format as shard 1, which the matrix covers
            if kind == "decoder" and f in ("generation_config.json", "special_tokens_map.json", "chat_template.jinja"):
                continue  # optional model files: their checksums are checked like the others
            assert (kind, f) in listed, f"{kind}: {f} is not in the corruption matrix"
