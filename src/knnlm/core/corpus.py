"""Read a text collection as documents: a `.txt` file is one stream, a `.jsonl` file
is one document per line (its `text` field); either may be gzip-compressed
(`.txt.gz`, `.jsonl.gz`) and is then read as it is, decompressed in memory.  Windows
line ends (CRLF) are read as plain newlines."""

from __future__ import annotations

import gzip
import hashlib
import zlib
import json
from dataclasses import dataclass
from pathlib import Path

from knnlm.errors import KnnlmError


@dataclass(frozen=True)
class Document:
    source: str  # file name the document came from
    index: int  # line number (jsonl, 1-based) or 0 (txt)
    title: str
    text: str


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _kind(path: Path) -> str:
    """"jsonl" for `.jsonl` / `.jsonl.gz` files, else "txt"."""
    name = path.name[: -len(".gz")] if path.name.endswith(".gz") else path.name
    return "jsonl" if name.endswith(".jsonl") else "txt"


def _title(path: Path) -> str:
    """A plain-text file's document title: its name without `.gz` and the text suffix."""
    name = path.name[: -len(".gz")] if path.name.endswith(".gz") else path.name
    return Path(name).stem


def _read_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if not path.name.endswith(".gz"):
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
        raise KnnlmError(f"corpus file is not a complete gzip file ({e}): {path}") from None


def _read_text(path: Path) -> str:
    if not path.exists():
        raise KnnlmError(f"corpus file not found: {path}")
    if path.is_dir():
        raise KnnlmError(f"corpus path is a directory, expected a .txt or .jsonl file (or .gz of one): {path}")
    data = _read_bytes(path)
    if not data.strip():
        raise KnnlmError(f"corpus file is empty: {path}")
    if b"\x00" in data[: 1 << 16]:
        raise KnnlmError(f"corpus file looks binary (NUL bytes), expected UTF-8 text: {path}")
    try:
        return data.decode("utf-8").replace("\r\n", "\n")  # Windows line ends: one token, not two
    except UnicodeDecodeError as e:
        raise KnnlmError(f"corpus file is not valid UTF-8 ({e.reason} at byte {e.start}): {path}") from None


def read_documents(path: str | Path, text_field: str = "text") -> list[Document]:
    """All documents of one corpus file, in file order; empty documents are dropped."""
    path = Path(path)
    text = _read_text(path)
    if _kind(path) == "jsonl":
        docs = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise KnnlmError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                raise KnnlmError(f"{path}:{lineno}: expected an object with a string field {text_field!r}")
            if row[text_field].strip():
                docs.append(Document(path.name, lineno, str(row.get("title", "")), row[text_field]))
        if not docs:
            raise KnnlmError(f"corpus file has no non-empty {text_field!r} field: {path}")
        return docs
    return [Document(path.name, 0, _title(path), text)]


def corpus_record(path: str | Path) -> dict:
    """Name, size and hash of a corpus file, for a datastore's meta.json."""
    path = Path(path)
    return {"name": path.name, "bytes": path.stat().st_size, "sha256": file_sha256(path)}
