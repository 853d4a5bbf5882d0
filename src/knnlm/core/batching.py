"""Tokenized documents cut into windows and grouped into batches; shared by datastore
building and evaluation so both see exactly the same windows."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from knnlm.core.corpus import Document, read_documents
from knnlm.core.windows import Window, make_windows
from knnlm.errors import KnnlmError


@dataclass
class Plan:
    tokens: np.ndarray  # int32 [T]: all documents' tokens, concatenated (prefix token first)
    docs: np.ndarray  # int64 [D, 3]: token start, token count, first target index
    doc_info: list[dict]
    windows: list[tuple[int, Window]]  # (document, window)
    batches: list[tuple[int, int]]  # [first, last) window of each batch
    count: int  # targets: every document token but the first

    def batch_input(self, b: int, pad_id: int | None = None):
        """Right-padded input ids (B, T) of batch b; padding never reaches a scored output."""
        import torch

        lo, hi = self.batches[b]
        wins = self.windows[lo:hi]
        longest = max(w.end - w.start for _, w in wins)
        pad = int(self.tokens[0]) if pad_id is None else pad_id
        ids = torch.full((len(wins), longest), pad, dtype=torch.long)  # (B, T)
        for row, (d, w) in enumerate(wins):
            s = int(self.docs[d, 0])
            ids[row, : w.end - w.start] = torch.from_numpy(self.tokens[s + w.start : s + w.end].astype(np.int64))
        return ids

    def scored(self, b: int):
        """For each window of batch b: (row, first and last output column, first target index)."""
        lo, hi = self.batches[b]
        for row, (d, w) in enumerate(self.windows[lo:hi]):
            yield row, w.score_from - w.start, w.end - w.start, int(self.docs[d, 2]) + w.score_from

    def targets(self) -> np.ndarray:
        """targets[i] = the token that target index i predicts."""
        keep = np.ones(len(self.tokens), dtype=bool)
        keep[self.docs[:, 0]] = False
        return self.tokens[keep]

    def batch_size(self, b: int) -> int:
        lo, hi = self.batches[b]
        return sum(w.end - w.score_from for _, w in self.windows[lo:hi])

    def doc_of(self, positions) -> np.ndarray:
        """The document of each target index in `positions`."""
        return doc_of(self.docs, positions)


def doc_of(docs: np.ndarray, positions) -> np.ndarray:
    """The document of each target (datastore entry) index in `positions`, from a document
    table whose third column is each document's first target index (a plan's or a datastore's)."""
    return np.searchsorted(docs[:, 2], positions, side="right") - 1


def check_windows(window: int, stride: int) -> None:
    if window < 2 or not 1 <= stride <= window:
        raise KnnlmError(f"need window >= 2 and 1 <= stride <= window, got window={window} stride={stride}")


@dataclass(frozen=True)
class WindowSettings:
    """Windows of `window` tokens every `stride` (each token scored once, with at least
    window - stride tokens of context after the first window), about `batch_tokens` a batch."""

    window: int = 1024
    stride: int = 512
    batch_tokens: int = 4096

    def __post_init__(self):
        check_windows(self.window, self.stride)
        if self.batch_tokens < 1:
            raise KnnlmError(f"batch tokens must be >= 1, got {self.batch_tokens}")


def make_plan(
    encode, documents: Sequence[Document], window: int, stride: int, batch_tokens: int
) -> Plan:
    """Tokenize `documents` with `encode` (text -> ids, prefix token first), cut windows
    per document (documents never share one) and group consecutive windows into
    batches of at most `batch_tokens` padded tokens."""
    check_windows(window, stride)
    streams, info = [], []
    for doc in documents:
        ids = np.asarray(encode(doc.text), dtype=np.int32)
        if len(ids) >= 2:
            streams.append(ids)
            info.append({"source": doc.source, "line": doc.index, "title": doc.title})
    if not streams:
        raise KnnlmError("the text has no document with a token to predict")
    lengths = np.array([len(s) for s in streams], dtype=np.int64)
    docs = np.zeros((len(streams), 3), dtype=np.int64)
    docs[:, 0] = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    docs[:, 1] = lengths
    docs[:, 2] = np.concatenate([[0], np.cumsum(lengths - 1)[:-1]])
    wins = [(d, w) for d, n in enumerate(lengths) for w in make_windows(int(n), window, stride)]
    batches, first, longest = [], 0, 0
    for i, (_, w) in enumerate(wins):
        longest_if = max(longest, w.end - w.start)
        if i > first and longest_if * (i - first + 1) > batch_tokens:
            batches.append((first, i))
            first, longest_if = i, w.end - w.start
        longest = longest_if
    batches.append((first, len(wins)))
    return Plan(np.concatenate(streams), docs, info, wins, batches, int((lengths - 1).sum()))


def plan_files(lm, paths: Sequence[str | Path], window: int, stride: int, batch_tokens: int,
               documents: tuple[int, int] | None = None) -> Plan:
    """The plan of the files' documents, or of documents a..b-1 of them with `documents=(a, b)`."""
    docs = [d for p in paths for d in read_documents(p)]
    if documents is not None:
        docs = docs[documents[0] : documents[1]]
    return make_plan(lm.encode, docs, window, stride, batch_tokens)
