"""Eval and generation speed of the default mixing (λ read from the nearest neighbour's
distance and the LM's confidence, and the continuous cache where the datastore tuned one, all
adapting) against the default before the λ table (one adaptive λ, no cache) and the base LM, in one process on one datastore: each system runs --repeats
times, interleaved, the best kept, and the ratios to the base LM of the same run are reported.

    python benchmarks/bench_default_speed.py --datastore DATASTORE --test-text TEXT \\
        --settings-from benchmarks/results/defaults.json:wikitext2 --eval-chars 20000

Eval: `knnlm.evaluate` of the first --eval-chars characters of the test text (whole lines;
the LM alone: no datastore).  Generation: `KNNLM.generate` of --new-tokens greedy tokens
(EOS ignored) after each of --prompts prompts (the first --prompt-tokens tokens of the first
test documents, or of evenly spaced pieces of a one-document text), one after the other.

--settings-from FILE:CASE takes the settings a datastore tuned for itself from a
bench_defaults.py result (its CASE's `settings`, tuned there on the datastore's own corpus
and not recorded: the shared datastore is only read) and records them in a copy of the
datastore under --work whose data files are links to the original's.  Writes --out (.json, .md).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from common import command_line, run_main, setup_logging, write_results

HERE = Path(__file__).resolve().parent


def linked_copy(src: Path, dst: Path, settings: dict) -> Path:
    """`src` as a datastore at `dst`: meta.json copied (then `settings` recorded in it), every
    other file and folder a symbolic link to the original's."""
    from knnlm.core.datastore import Datastore

    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name == "meta.json":
            shutil.copy2(f, dst / f.name)
        else:
            (dst / f.name).symlink_to(f.resolve(), target_is_directory=f.is_dir())
    Datastore(dst).record_settings({f: v for f, v in settings.items() if f != "datastore_version"})
    return dst


def excerpt(text: Path, chars: int | None, out: Path) -> Path:
    """The first whole lines of `text` up to `chars` characters (all of it without `chars`)."""
    if not chars:
        return text
    keep, n = [], 0
    for line in text.read_text(encoding="utf-8").splitlines(keepends=True):
        if n + len(line) > chars and keep:
            break
        keep.append(line)
        n += len(line)
    out.write_text("".join(keep), encoding="utf-8")
    return out


def run(a, work: Path) -> dict:
    import knnlm
    from knnlm import KNNLM, MixSettings, Sampling
    from knnlm.core.corpus import read_documents
    from knnlm.core.datastore import Datastore

    ds = Path(a.datastore)
    source = "recorded"
    if a.settings_from:
        file, _, case = a.settings_from.partition(":")
        res = json.loads(Path(file).read_text())
        ds = linked_copy(ds, work / "ds", res[case]["settings"] if case else res)
        source = a.settings_from
    table = (Datastore(ds).settings or {}).get("lambda_by_distance")
    test = excerpt(Path(a.test_text), a.eval_chars, work / "test.txt")
    lm = knnlm.load_lm(a.model, dtype="bfloat16")
    systems = {"lm": (None, None), "before": (ds, MixSettings(by_distance=False, cache_lambda=0)),  # one adaptive λ, no cache
               "default": (ds, MixSettings())}
    knns = {name: KNNLM(lm, {"ds": d} if d else None, mixing=mix) for name, (d, mix) in systems.items()}
    docs = read_documents(test)
    if len(docs) >= a.prompts:  # the first tokens of the first documents
        prompts = [lm.encode(d.text)[: a.prompt_tokens] for d in docs[: a.prompts]]
    else:  # one long text: pieces of it, evenly spaced
        ids = lm.encode("".join(d.text for d in docs))
        step = max(1, len(ids) // a.prompts)
        prompts = [ids[j : j + a.prompt_tokens] for j in range(0, step * a.prompts, step)]
    greedy = Sampling(ignore_eos=True)
    best = {f"{kind}_{name}": float("inf") for kind in ("eval", "generate") for name in systems}
    ppl, tokens = {}, 0
    for _ in range(a.repeats):
        for name, (d, mix) in systems.items():
            t0 = time.perf_counter()
            res = knnlm.evaluate(lm, [test], d, mixing=mix, progress=False)
            best[f"eval_{name}"] = min(best[f"eval_{name}"], time.perf_counter() - t0)
            ppl[name] = res.get("ppl", res["ppl_lm"])  # every memory the system mixes
            tokens = res["tokens"]
            t0 = time.perf_counter()
            for p in prompts:
                knns[name].generate(p, a.new_tokens, greedy)
            best[f"generate_{name}"] = min(best[f"generate_{name}"], time.perf_counter() - t0)
    gen_tokens = a.new_tokens * len(prompts)
    return {"datastore_entries": Datastore(ds).count, "settings_source": source, "lambda_by_distance": table,
            "eval_tokens": tokens, "generated_tokens": gen_tokens, "repeats": a.repeats,
            "seconds": {k: round(v, 3) for k, v in best.items()}, "ppl": ppl,
            "tokens_per_second": {k: round((tokens if k.startswith("eval") else gen_tokens) / v, 1)
                                  for k, v in best.items()},
            "ratio_to_lm": {k: round(best[k.split("_")[0] + "_lm"] / v, 3) for k, v in best.items()}}


def render(r: dict, command: str) -> str:
    rows = ["| system | eval tokens/s | eval vs LM | generate tokens/s | generate vs LM | ppl (eval text) |",
            "|---|---:|---:|---:|---:|---:|"]
    names = {"lm": "LM alone", "before": "before (one adaptive λ)", "default": "**default** (λ table and the continuous cache where tuned, adaptive)"}
    for key, label in names.items():
        tps, ratio = r["tokens_per_second"], r["ratio_to_lm"]
        rows.append(f"| {label} | {tps['eval_' + key]} | {ratio['eval_' + key]:.3f} | {tps['generate_' + key]} | "
                    f"{ratio['generate_' + key]:.3f} | {r['ppl'][key]:.3f} |")
    return "\n".join([f"Eval of {r['eval_tokens']} tokens, generation of {r['generated_tokens']} greedy tokens; the best "
                      f"of {r['repeats']} interleaved runs each; datastore of {r['datastore_entries']} entries.", "",
                      *rows, "", "    " + command, ""])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datastore", required=True)
    ap.add_argument("--test-text", required=True)
    ap.add_argument("--settings-from", default=None, metavar="FILE:CASE",
                    help="tuned settings from a bench_defaults.py result (default: the datastore's recorded ones)")
    ap.add_argument("--eval-chars", type=int, default=None, help="evaluate only this many first characters")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--work", default=None, help="folder for the linked datastore copy and the excerpt (default: a "
                                                 "temporary one, removed at the end)")
    ap.add_argument("--out", default=str(HERE / "results" / "default-speed"))
    a = ap.parse_args()
    setup_logging("bench", fmt="%(name)s: %(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.work) if a.work else Path(tmp)
        res = run(a, work)
    write_results(res, a.out, render, command_line("bench_default_speed.py", {
        "DATASTORE": a.datastore, "TEXT": a.test_text, "OUT": a.out, "WORK": a.work}))
    return 0


if __name__ == "__main__":
    run_main(main)
