"""Gzip-compressed corpora (`.txt.gz`, `.jsonl.gz`) read exactly as the plain files."""

import gzip
import shutil

import numpy as np
import pytest

from knnlm.core.corpus import read_documents
from knnlm.core.datastore import Datastore, build_datastore
from knnlm.errors import KnnlmError


def gzip_copy(src, dst):
    with open(src, "rb") as f, gzip.open(dst, "wb") as g:
        shutil.copyfileobj(f, g)
    return dst


@pytest.mark.parametrize("name", ["corpus", "jsonl_corpus"])
def test_gzip_file_gives_the_same_documents(name, request, tmp_path):
    plain = request.getfixturevalue(name)
    packed = gzip_copy(plain, tmp_path / (plain.name + ".gz"))
    a, b = read_documents(plain), read_documents(packed)
    assert [(d.index, d.title, d.text) for d in a] == [(d.index, d.title, d.text) for d in b]
    assert len(b) == (1 if name == "corpus" else 8)
    assert all(d.source == packed.name for d in b)


def test_txt_gz_title_drops_both_suffixes(corpus, tmp_path):
    packed = gzip_copy(corpus, tmp_path / "Bleak House.txt.gz")
    assert read_documents(packed)[0].title == "Bleak House"


def test_gzip_datastore_equals_the_plain_one(lm, corpus, jsonl_corpus, tmp_path):
    args = dict(window=32, stride=16, batch_tokens=128, progress=False)
    build_datastore(lm, [corpus, jsonl_corpus], tmp_path / "plain", **args)
    packed = [gzip_copy(p, tmp_path / (p.name + ".gz")) for p in (corpus, jsonl_corpus)]
    build_datastore(lm, packed, tmp_path / "packed", **args)
    a, b = Datastore(tmp_path / "plain"), Datastore(tmp_path / "packed")
    assert a.count == b.count > 0
    for name in ("keys", "vals", "tokens", "docs"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert [d["title"] for d in a.doc_info] == [d["title"] for d in b.doc_info]
    assert [c["name"] for c in b.meta["corpora"]] == ["corpus.txt.gz", "docs.jsonl.gz"]


@pytest.mark.parametrize("damage", ["truncated", "not-gzip"])
def test_damaged_gzip_is_one_clear_error(corpus, tmp_path, damage):
    packed = gzip_copy(corpus, tmp_path / "c.txt.gz")
    data = packed.read_bytes()
    packed.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"plain text, not gzip\n")
    with pytest.raises(KnnlmError, match="not a complete gzip file.*c.txt.gz"):
        read_documents(packed)


def test_windows_line_ends_read_as_newlines(tmp_path):
    (tmp_path / "unix.txt").write_bytes(b"Chapter 1.\n\nIt was a dark night.\n")
    (tmp_path / "dos.txt").write_bytes(b"Chapter 1.\r\n\r\nIt was a dark night.\r\n")
    assert read_documents(tmp_path / "dos.txt")[0].text == read_documents(tmp_path / "unix.txt")[0].text
