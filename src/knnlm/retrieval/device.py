"""The whole kNN step in torch on the model's device: exact search, exact re-ranking and
p_kNN, with no host round trip (on a GPU the query keys never leave it).

`DeviceSearcher` holds a datastore's keys on a device (float16 on CUDA, float32 on a CPU,
where half-precision matrix products are slow) with their squared norms.  A search is
one matrix product per chunk of keys, ||q||^2 - 2 q.k + ||k||^2, a running top-k merged
across chunks, then the k winners' distances recomputed exactly as sum((k - q)^2) from
the stored float16 keys and re-sorted, the same numbers `Searcher.exact` gives.  It has
the `Searcher` interface (`search`, `exact`, `settings`, `ds`), so every caller works
unchanged; `evaluate` also uses `target_logprobs`, which keeps everything on the device.
Pick it with the index name `torch` (`knnlm eval -d ds --index torch`).  Exact search
costs O(N d) per query: meant for datastores whose keys fit the device.

A FAISS index (any other index name) goes to the GPU too when the model is on CUDA and
FAISS was built with GPU support (`pip install 'knnlm[gpu]'`, the faiss-gpu-cu12 wheel:
README); otherwise, or if FAISS cannot move that index, it stays on the CPU with one log
line saying why.  A device that is not there (`cuda` without CUDA) falls back to the CPU
the same way: every path has the CPU path's neighbours.
"""

from __future__ import annotations

import logging

import numpy as np

from knnlm.core.datastore import Datastore
from knnlm.errors import KnnlmError

LOG = logging.getLogger(__name__)

INDEX_NAME = "torch"  # the index name that selects this searcher


class DeviceSearcher:
    """Exact k-nearest-neighbour search over one datastore with torch on `device`."""

    on_device = True

    def __init__(self, ds: Datastore, device: str = "cpu", chunk: int = 65536):
        import torch

        self.ds, self.device, self.chunk = ds, usable_device(device), chunk
        self.name = INDEX_NAME
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        keys = torch.from_numpy(np.array(ds.keys))  # (N, d) float16, a host copy (the memmap is read-only)
        self.keys16 = keys.to(self.device)  # the stored keys, for exact re-ranking
        self.keys = self.keys16 if dtype == torch.float16 else self.keys16.float()  # (N, d) for the products
        self.sqnorm = (self.keys16.float() ** 2).sum(1)  # (N,) float32
        self.removed = None
        if ds.removed is not None:  # removed documents' entries: infinitely far (never among the top k)
            self.removed = torch.from_numpy(np.asarray(ds.removed)).to(self.device)
            self.sqnorm[self.removed] = float("inf")
        self.vals = torch.from_numpy(np.asarray(ds.vals, dtype=np.int64)).to(self.device)  # (N,)
        self.rerank = True
        self.nprobe = None
        self._transform = None
        self._log_counts = None

    def settings(self) -> dict:
        return {"index": self.name, "factory": f"exact (torch, {self.device.type})", "nprobe": None, "rerank": True}

    # ---- torch in, torch out (on the device) -------------------------------------------
    def search_torch(self, q, k: int, rows: int = 256):
        """dists (m, k) float32 squared L2, ascending, and ids (m, k) int64 of queries q (m, d),
        all on the device; `rows` queries at a time bound the (rows, chunk) distance block."""
        import torch

        if k > self.ds.count:
            raise KnnlmError(f"k={k} is larger than the datastore ({self.ds.count} entries)")
        q = self.to_key_space(q.to(self.device).float())
        out = [self._search_block(q[a : a + rows], k) for a in range(0, len(q), rows)]
        if not out:
            return torch.empty(0, k, device=self.device), torch.empty(0, k, dtype=torch.long, device=self.device)
        return torch.cat([d for d, _ in out]), torch.cat([i for _, i in out])

    def to_key_space(self, q):
        """`Datastore.to_key_space` for a torch tensor (m, query_dim) on the device."""
        import torch

        if q.ndim != 2 or q.shape[1] != self.ds.query_dim:
            self.ds.to_key_space(np.zeros((1, q.shape[-1]), np.float32))  # raises the datastore's own error
        if not self.ds.reduction:
            return q
        if self._transform is None:
            eye = np.eye(self.ds.query_dim, dtype=np.float32)
            mean = self.ds.to_key_space(np.zeros((1, self.ds.query_dim), np.float32))  # (1, dim) = -mean @ W.T
            comp = self.ds.to_key_space(eye) - mean  # (query_dim, dim) = W.T
            self._transform = (torch.from_numpy(mean).to(self.device), torch.from_numpy(comp).to(self.device))
        mean, comp = self._transform
        return q @ comp + mean

    def _search_block(self, q, k: int):
        import torch

        best_d = best_i = None
        qk = q.to(self.keys.dtype)
        for a in range(0, self.ds.count, self.chunk):
            keys = self.keys[a : a + self.chunk]  # (c, d)
            d = self.sqnorm[a : a + self.chunk][None, :] - 2 * (qk @ keys.T).float()  # (b, c), ||q||^2 left out
            top_d, top_i = torch.topk(d, min(k, d.shape[1]), dim=1, largest=False)  # (b, kk)
            top_i = top_i + a
            if best_d is None:
                best_d, best_i = top_d, top_i
            else:
                cat_d, cat_i = torch.cat([best_d, top_d], 1), torch.cat([best_i, top_i], 1)
                best_d, pick = torch.topk(cat_d, min(k, cat_d.shape[1]), dim=1, largest=False)
                best_i = torch.gather(cat_i, 1, pick)
        if self.removed is not None:  # fewer live entries than k: removed ones (infinitely far) fill the rest
            best_i = torch.where(torch.isinf(best_d), torch.full_like(best_i, -1), best_i)
        exact = self.exact_torch(q, best_i)  # (b, k): re-ranked with exact distances
        exact, order = torch.sort(exact, dim=1, stable=True)
        return exact, torch.gather(best_i, 1, order)

    def exact_torch(self, q, ids, budget: int = 2**25):
        """sum((key - q)^2) (m, c) float32 from the stored float16 keys; inf where ids < 0.
        Rows in blocks of about `budget` gathered key values."""
        import torch

        m, c = ids.shape
        out = torch.empty(m, c, dtype=torch.float32, device=self.device)
        step = max(1, budget // max(1, c * self.ds.dim))
        for a in range(0, m, step):
            keys = self.keys16[ids[a : a + step].clamp(min=0)].float()  # (b, c, d)
            out[a : a + step] = ((keys - q[a : a + step].float()[:, None, :]) ** 2).sum(-1)
        return torch.where(ids >= 0, out, torch.full_like(out, float("inf")))

    def target_logprobs(self, q, targets, k: int, temperature: float, with_nearest: bool = False):
        """log p_kNN(target) (m,) float64 on the device: search, re-rank and the kNN softmax
        without leaving it; -inf where no neighbour has the target.  `with_nearest`: also
        the nearest neighbour's distance (m,)."""
        import torch

        d, i = self.search_torch(q, k)
        d = d.double()
        near = d.min(1, keepdim=True).values  # shifted as knn_logits (a tiny T must not overflow)
        logits = -(d - torch.where(torch.isfinite(near), near, torch.zeros_like(near))) / temperature  # (m, k)
        if self.ds.counts is not None:  # a merged entry weighs as many as it stands for
            if self._log_counts is None:
                self._log_counts = torch.from_numpy(np.log(np.asarray(self.ds.counts, np.float64))).to(self.device)
            logits = logits + self._log_counts[i]
        hit = self.vals[i] == targets.to(self.device)[:, None]
        all_lse = torch.logsumexp(logits, 1)
        hit_lse = torch.logsumexp(torch.where(hit, logits, torch.full_like(logits, -float("inf"))), 1)
        return (hit_lse - all_lse, near[:, 0]) if with_nearest else hit_lse - all_lse

    # ---- the Searcher interface (numpy in, numpy out) ------------------------------------
    def search(self, queries: np.ndarray, k: int, exclude: np.ndarray | None = None):
        import torch

        if exclude is not None:
            from knnlm.core.index import search_excluding

            return search_excluding(self.search, self.ds.document_of, queries, k, exclude, self.ds.count)
        d, i = self.search_torch(torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)), k)
        return d.cpu().numpy(), i.cpu().numpy()

    def exact(self, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
        import torch

        q = torch.from_numpy(np.ascontiguousarray(self.ds.to_key_space(queries))).to(self.device)
        from knnlm.core.index import live_ids

        return self.exact_torch(q, torch.from_numpy(live_ids(self.ds, ids)).to(self.device)).cpu().numpy()


def usable_device(device: str):
    """torch.device(device), or the CPU (logged) when that device is not available here."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        LOG.warning("device %s is not available (torch sees no CUDA device): the kNN step runs on the CPU", device)
        return torch.device("cpu")
    return dev


def faiss_gpus() -> int:
    """How many GPUs FAISS can use: 0 with the faiss-cpu wheel (no GPU build) or no CUDA device."""
    import faiss

    if not hasattr(faiss, "StandardGpuResources") or not hasattr(faiss, "index_cpu_to_gpu"):
        return 0
    try:
        return int(faiss.get_num_gpus())
    except (RuntimeError, AttributeError):
        return 0


def to_faiss_gpu(searcher, device: str) -> bool:
    """Move a Searcher's FAISS index to the GPU of `device` (cuda[:N]) when FAISS can; the
    exact re-ranking (IndexRefine's float16 keys) stays on the host.  False, with one log
    line, when it stays on the CPU: no GPU build of FAISS, no such GPU, or an index FAISS
    cannot put on a GPU (e.g. a PQ with a sub-vector size its kernels lack)."""
    import torch

    dev = torch.device(device)
    if dev.type != "cuda":
        return False
    n = faiss_gpus()
    gpu = dev.index or 0
    if gpu >= n:
        LOG.info("FAISS has %s: index %s searched on the CPU (GPU search: pip install 'knnlm[gpu]', README)",
                 "no GPU support" if n == 0 else f"{n} GPU(s), not cuda:{gpu}", searcher.name)
        return False
    import faiss

    try:
        res = faiss.StandardGpuResources()
        opts = faiss.GpuClonerOptions()
        opts.useFloat16 = True  # IVF-PQ lookup tables in float16: needed for 64-byte codes
        moved = faiss.index_cpu_to_gpu(res, gpu, searcher.index, opts)
    except (RuntimeError, AttributeError) as e:
        LOG.warning("FAISS cannot put index %s on cuda:%d (%s): searched on the CPU", searcher.name, gpu,
                    str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__)
        return False
    searcher.gpu_resources = res  # must live as long as the index
    searcher.index = moved
    searcher.scan_few = False  # the GPU's Flat search, not the host's float16 scan
    if searcher._refine is not None:
        searcher._refine = faiss.IndexRefine(moved, searcher._exact)
        searcher._refine.k_factor = 1.0
    LOG.info("index %s searched on cuda:%d (FAISS GPU)", searcher.name, gpu)
    return True


def open_searcher(ds: Datastore, index: str | None = None, nprobe: int | None = None, rerank: bool | None = None,
                  device: str = "cpu"):
    """`Searcher(ds, index, ...)` (its FAISS index on the GPU when `device` is CUDA and FAISS
    can, see `to_faiss_gpu`), or with index `torch` an exact DeviceSearcher on `device`."""
    if index == INDEX_NAME:
        return DeviceSearcher(ds, device)
    from knnlm.core.index import Searcher

    searcher = Searcher(ds, index, nprobe=nprobe, rerank=rerank)
    to_faiss_gpu(searcher, device)
    return searcher
