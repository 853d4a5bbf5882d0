"""The index a datastore build makes as it goes, in step with its forward pass
(`BuildSettings.index`): trained on the build's first keys once they are on disk, each
flushed batch's keys added, written into the unfinished datastore and published with it."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from knnlm.core.corpus import file_sha256
from knnlm.core.datastore import write_json_atomic
from knnlm.core.index import (ADD_CHUNK, _faiss, _index_record, auto_factory, index_name, new_index,
                              train_sample, train_sample_size, write_index)
from knnlm.errors import KnnlmError

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class IndexSettings:
    """The index a datastore build makes as it goes (`BuildSettings.index`): `kind` "auto"
    (by the planned size, `auto_factory`), "Flat" or a FAISS factory string; its `name`
    (None: from the factory), the `nprobe` its searches default to, and the number of
    first keys it trains on (`train_size`, None: `train_sample_size`)."""

    kind: str = "auto"
    name: str | None = None
    nprobe: int = 32
    train_size: int | None = None

    def __post_init__(self):
        if not isinstance(self.kind, str) or not self.kind or self.kind == "none":
            raise KnnlmError(f"index kind must be auto, Flat or a FAISS factory string, got {self.kind!r}")
        if self.nprobe < 1:
            raise KnnlmError(f"nprobe must be >= 1, got {self.nprobe}")
        if self.train_size is not None and self.train_size < 1:
            raise KnnlmError(f"train size must be >= 1, got {self.train_size}")

    def filler(self, root: Path, count: int, dim: int) -> "IndexFiller":
        return IndexFiller(self, root, count, dim)


class IndexFiller:
    """An index made during a datastore build, in step with its forward pass.

    The factory is chosen from the planned entry count; the index is trained on the first
    `train_sample_size` keys as soon as they are on disk (an early sample: the documents
    read first, not a uniform sample of all; `knnlm index --overwrite` trains on a uniform
    one), then every flushed batch's keys are added.  `finish` writes it into the unfinished
    datastore's directory (`<root>/indexes/<name>/`), which is published with it: no index
    is ever seen half-written.  The trained, still empty index is kept in `<root>` as a
    checkpoint, so a resumed build does not train again: it adds the keys already on disk.
    """

    def __init__(self, settings: IndexSettings, root: Path, count: int, dim: int):
        kind = settings.kind
        self.factory = auto_factory(count, dim) if kind == "auto" else ("Flat" if kind.lower() == "flat" else kind)
        self.name = settings.name or index_name(self.factory)
        self.settings, self.root, self.count, self.dim = settings, Path(root), count, dim
        self.index = new_index(dim, self.factory)  # an invalid factory fails here, before the forward pass
        self.n_train = 0 if self.index.is_trained else min(count, settings.train_size
                                                            or train_sample_size(self.factory))
        need = _min_train(self.factory)
        if self.n_train and self.n_train < need:
            raise KnnlmError(f"cannot train {self.factory} on the {count} keys this build makes: it needs {need}")
        self.added = 0
        self.seconds = 0.0  # index work (training, adding) in this process

    @property
    def _checkpoint(self) -> tuple[Path, Path]:
        return self.root / f"trained-{self.name}.faiss", self.root / f"trained-{self.name}.json"

    def resume(self, keys: np.ndarray, rows: int) -> None:
        """Catch up with a resumed build whose first `rows` keys are on disk: the trained
        checkpoint (or a training on the same first keys), then those keys added."""
        t0 = time.time()
        if self.n_train and not self.index.is_trained:
            loaded = self._load_checkpoint()
            if loaded is not None:
                self.index = loaded
                LOG.info("resuming index %s from its trained checkpoint", self.factory)
        self.seconds += time.time() - t0
        self.flushed(keys, rows)

    def flushed(self, keys: np.ndarray, rows: int) -> None:
        """The first `rows` entries of `keys` (N, d) are on disk: train once enough are, add
        the ones not added yet."""
        t0 = time.time()
        if not self.index.is_trained and rows >= self.n_train:
            train_sample(self.index, self.factory, keys[: self.n_train])
            self._save_checkpoint()
        if self.index.is_trained:
            for a in range(self.added, rows, ADD_CHUNK):
                self.index.add(np.asarray(keys[a : min(rows, a + ADD_CHUNK)], dtype=np.float32))
            self.added = max(self.added, rows)
        self.seconds += time.time() - t0

    def finish(self, datastore_id: str) -> Path:
        """Write the filled index under `<root>/indexes/<name>/` for the datastore
        `datastore_id` (every key added); returns that directory."""
        if self.added != self.count or self.index.ntotal != self.count:
            raise KnnlmError(f"the index holds {self.index.ntotal} keys, the datastore {self.count}")
        directory = self.root / "indexes" / self.name
        if directory.exists():  # an earlier attempt stopped before publishing
            shutil.rmtree(directory)
        info = _index_record(self.index, self.factory, self.dim, self.n_train, "first", self.settings.nprobe,
                            datastore_id, 0, self.seconds)
        write_index(self.index, info, directory)
        for f in self._checkpoint:
            f.unlink(missing_ok=True)
        return directory

    def _save_checkpoint(self) -> None:
        faiss_file, json_file = self._checkpoint
        tmp = faiss_file.with_suffix(".tmp")
        _faiss().write_index(self.index, str(tmp))
        os.replace(tmp, faiss_file)
        record = {"factory": self.factory, "train_size": self.n_train, "sha256": file_sha256(faiss_file)}
        write_json_atomic(json_file, record)  # last: it names the file complete

    def _load_checkpoint(self):
        faiss_file, json_file = self._checkpoint
        try:
            record = json.loads(json_file.read_text())
            if (record.get("factory"), record.get("train_size")) != (self.factory, self.n_train) \
                    or file_sha256(faiss_file) != record.get("sha256"):
                return None
            index = _faiss().read_index(str(faiss_file))
        except (OSError, ValueError, RuntimeError, AttributeError):
            return None
        return index if index.is_trained and index.ntotal == 0 and index.d == self.dim else None


def _min_train(factory: str) -> int:
    """The fewest keys FAISS trains `factory` on: one per IVF list, 2^bits per PQ centroid."""
    need = 1
    m = re.search(r"IVF(\d+)", factory)
    if m:
        need = int(m.group(1))
    pq = re.search(r"PQ\d+(?:x(\d+))?", factory)
    if pq:
        need = max(need, 2 ** int(pq.group(1) or 8))
    return need
