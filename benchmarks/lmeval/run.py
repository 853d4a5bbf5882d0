"""lm-evaluation-harness on `knnlm serve`: the wikitext_cloze task with and without a
datastore, exactly the commands of docs/lm-eval.md.

For each setting this starts `knnlm serve` (an API key in KNNLM_API_KEY; the datastore the
requests get is --default-datastore: `none` for the base LM, `wiki` for the kNN-LM), runs
the `lm_eval` command line against it (`local-completions`, the key in OPENAI_API_KEY),
and stops the server.  The base LM and the kNN-LM see the same requests.

    python benchmarks/lmeval/run.py                                         # builds the task if needed
    python benchmarks/lmeval/run.py --datastore /work/cache/wikitext2/ds-bfloat16 --index ivf2048-pq64

The datastore defaults to benchmarks/bench_wikitext.py's (wiki.valid.raw without its
held-out articles; `python benchmarks/bench_wikitext.py --phases quality` builds it).
Results: benchmarks/results/lmeval.{json,md}.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import secrets
import shlex
import subprocess
import sys
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
TASK = "wikitext_cloze"


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"error: knnlm serve exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("error: knnlm serve did not start")


def show(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)


def run_one(args, label: str, default: str, extra: str, tokenizer: str, key: str, tag: str) -> dict:
    from common import placeholders

    url = f"http://127.0.0.1:{args.port}"
    serve = ["knnlm", "-q", "serve", "-d", f"wiki={args.datastore}", "--default-datastore", default,
             "--port", str(args.port), "--max-queue", str(2 * args.batch_size)]
    serve += ["--index", args.index] if args.index else []
    serve += extra.split()
    out_dir = Path(args.cache) / f"out-{tag}"
    lm_eval = ["lm_eval", "--model", "local-completions", "--model_args",
               f"base_url={url}/v1/completions,tokenizer_backend=huggingface,tokenizer={tokenizer},"
               f"model={args.model_name}", "--batch_size", str(args.batch_size),
               "--tasks", TASK, "--include_path", "benchmarks/lmeval", "--output_path", os.path.relpath(out_dir, REPO)]
    env = {**os.environ, "KNNLM_API_KEY": key, "OPENAI_API_KEY": key, "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}
    bindir = Path(sys.executable).parent  # the knnlm and lm_eval of this environment
    proc = subprocess.Popen([sys.executable, "-m"] + serve, cwd=REPO, env=env)  # `knnlm serve`, from src/
    try:
        wait_healthy(url, proc)
        probe = httpx.post(url + "/v1/completions", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                           json={"prompt": "The", "max_tokens": 0, "echo": True}).json()
        settings = probe["choices"][0]["knnlm"]
        t0 = time.perf_counter()
        subprocess.run([str(bindir / lm_eval[0])] + lm_eval[1:], cwd=REPO, env=env, check=True)
        seconds = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(60)
    found = sorted(glob.glob(str(out_dir / "**" / "results_*.json"), recursive=True), key=os.path.getmtime)
    res = json.loads(Path(found[-1]).read_text())["results"][TASK]
    return {"label": label, "settings": settings, "seconds": seconds, "acc": res["acc,none"],
            "acc_stderr": res["acc_stderr,none"], "acc_norm": res["acc_norm,none"],
            "acc_norm_stderr": res["acc_norm_stderr,none"],
            "commands": {"serve": "KNNLM_API_KEY=$KEY " + placeholders(show(serve)),
                         "lm_eval": "OPENAI_API_KEY=$KEY " + placeholders(show(lm_eval))}}


def render(r: dict) -> str:
    from common import PLACEHOLDERS, placeholders

    t = r["task"]
    lines = [f"# lm-evaluation-harness on `knnlm serve`: {TASK}", "",
             f"{t['examples']} four-way last-word questions from {t['articles']} WikiText-2 test articles "
             f"(`{t['source']}`, sha256 `{t['sha256'][:16]}…`; JSONL sha256 `{t['jsonl_sha256'][:16]}…`), "
             "scored by lm-evaluation-harness's `local-completions` model through `knnlm serve` "
             f"({r['model']}, {r['machine']}, {r['cpus']} CPU cores). The datastore: `{placeholders(r['datastore'])}` "
             "(WikiText-2 valid minus held-out articles: disjoint from the test articles).", "",
             "| setting | acc | acc_norm | λ | k | T | lm_eval seconds |", "|---|---|---|---|---|---|---|"]
    for x in r["runs"]:
        s = x["settings"]
        lines.append(f"| {x['label']} | {x['acc']:.3f} ± {x['acc_stderr']:.3f} | {x['acc_norm']:.3f} ± "
                     f"{x['acc_norm_stderr']:.3f} | {s.get('lambda', '–')} | {s.get('k', '–')} | "
                     f"{s.get('knn_temperature', '–')} | {x['seconds']:.0f} |")
    base = r["runs"][0]
    lines.append("")
    for knn in r["runs"][1:]:
        lines.append(f"- {knn['label']} minus base LM: acc {knn['acc'] - base['acc']:+.3f}, "
                     f"acc_norm {knn['acc_norm'] - base['acc_norm']:+.3f}")
    lines += ["", f"Same {t['examples']} questions in every run; ± is lm-eval's standard error of each mean. "
              "Seconds are the wall time of each `lm_eval` command on a machine shared with other jobs: "
              "not a speed measurement.",
              "", "## Commands", "",
              "```", placeholders(r["command"]), "```", "", "which runs, for each setting, from the repository root:",
              "", "```"]
    for x in r["runs"]:
        lines += [placeholders(x["commands"]["serve"]) + " &", placeholders(x["commands"]["lm_eval"])]
    lines += ["```", "", f"{PLACEHOLDERS}.", "", "See [docs/lm-eval.md](../../docs/lm-eval.md) for the recipe.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datastore", default=str(REPO / "benchmarks" / "cache" / "wikitext2" / "ds-bfloat16"))
    ap.add_argument("--index", default="ivf2048-pq64", help="index inside the datastore")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="folder with wikitext-2-raw/")
    ap.add_argument("--examples", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=8, help="prompts per request (lm-eval's batch_size)")
    ap.add_argument("--port", type=int, default=8137)
    ap.add_argument("--model-name", default="smollm2-135m", help="the served model's id")
    ap.add_argument("--knn", action="append", default=None, metavar="LAMBDA,T,K",
                    help="a kNN-LM run with these settings (repeatable; default: the datastore's own defaults)")
    ap.add_argument("--context-chars", type=int, default=600, help="article text before each question, at most")
    ap.add_argument("--cache", default=str(REPO / "benchmarks" / "cache" / "lmeval"))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "lmeval"))
    ap.add_argument("--render", action="store_true", help="only rewrite the .md from the recorded .json")
    args = ap.parse_args()
    if args.render:
        res = json.loads(Path(args.out).with_suffix(".json").read_text())
        Path(args.out).with_suffix(".md").write_text(render(res))
        return
    sys.path.insert(0, str(REPO / "src"))
    from knnlm.core.assets import ensure_default_model

    jsonl = Path(args.cache) / f"{TASK}.jsonl"
    if jsonl != REPO / "benchmarks" / "cache" / "lmeval" / f"{TASK}.jsonl":
        raise SystemExit(f"error: the task YAML reads benchmarks/cache/lmeval/{TASK}.jsonl; keep --cache's default")
    subprocess.run([sys.executable, str(HERE / "build_task.py"), "--data", args.data, "--examples",
                    str(args.examples), "--context-chars", str(args.context_chars), "--out", str(jsonl)], check=True)
    task = json.loads(jsonl.with_suffix(".manifest.json").read_text())
    from common import placeholders

    tokenizer = str(ensure_default_model())
    key = secrets.token_urlsafe(16)
    runs = [run_one(args, "base LM (`--default-datastore none`)", "none", "", tokenizer, key, "base")]
    for i, spec in enumerate(args.knn or [""]):
        lam, temp, k = spec.split(",") if spec else ("", "", "")
        extra = f"--lambda {lam} --knn-temperature {temp} -k {k}" if spec else ""
        label = f"kNN-LM (`--default-datastore wiki`{', ' + extra if extra else ''})"
        runs.append(run_one(args, label, "wiki", extra, tokenizer, key, f"knn{i}"))
    res = {"task": task, "runs": runs, "model": args.model_name, "machine": platform.machine(),
           "cpus": os.cpu_count(), "datastore": placeholders(args.datastore),
           "command": placeholders("python benchmarks/lmeval/run.py " + " ".join(
               f"--{k.replace('_', '-')} {shlex.quote(str(x))}" for k, v in vars(args).items()
               if k not in ("cache", "out", "render") and v is not None for x in (v if isinstance(v, list) else [v])))}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
    out.with_suffix(".md").write_text(render(res))
    print(render(res))


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common.py
    from common import run_main  # a failure ends in one `error:` line

    run_main(main)
