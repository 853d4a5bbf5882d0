"""The novels benchmark's page: benchmarks/results/novels.{md,json} and the size curve's plot
(docs/img/novels-size-curve.png) from what bench_novels.py's phases cached."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from common import HERE

LOG = logging.getLogger("bench_novels")


def render(cache: Path, log: dict, command: str, split: dict, sizes: dict) -> None:
    """results/novels.{json,md} and the size curve's plot from the points that ran; `split`:
    benchmarks/novels.json, `sizes`: size name -> novels of the datastore's order."""
    titles = {r["file"]: r["title"] for r in split["novels"]}
    points = {size: json.loads((cache / f"point-{size}.json").read_text("utf-8"))
              for size in sizes if (cache / f"point-{size}.json").exists()}
    results = HERE / "results"
    speed = {size: json.loads((cache / f"speed-{size}.json").read_text("utf-8"))
             for size in sizes if (cache / f"speed-{size}.json").exists()}
    indexes = {path.stem.split("-", 1)[1]: json.loads(path.read_text("utf-8")) for path in sorted(cache.glob("indexes-*.json"))}
    variants = {path.stem.split("-", 1)[1]: json.loads(path.read_text("utf-8"))
                for path in sorted(cache.glob("variants-*.json"))}
    everything = {"points": points, "speed": speed, "variants": variants, "indexes": indexes, "build_log": log}
    (results / "novels.json").write_text(json.dumps(everything, indent=1) + "\n", "utf-8")
    made = [f"python benchmarks/bench_novels.py point --size {size} --cache CACHE" for size in points]
    made.append(command.replace(str(cache), "CACHE"))
    lines = ["# The kNN-LM on 41 English novels", "",
             "Made by " + ", then ".join(f"`{c}`" for c in made) + " (CACHE: the `--cache` folder, by default benchmarks/cache/novels; see `benchmarks/bench_novels.py --help`), "
             "on 2 CPU cores, SmolLM2-135M in bfloat16.  Held out: "
             + ", ".join(titles[f] for f in split["tune"]) + " (tuning); "
             + ", ".join(titles[f] for f in split["test"]) + " (test); each read from its start "
             "(`--chars`, windows 1024/512).  *Own settings*: the k, λ, T that the datastore's self-tuning "
             "recorded (leave-own-document-out on its own novels), applied as a fixed λ; *tuned*: chosen on the "
             "tuning novels; *test optimum*: chosen on the test text itself (a bound, not a method); *default*: what "
             "`knnlm eval` does with the datastore's recorded settings (λ from each position's nearest distance, "
             "adapting over the text; λ end: where the adaptive λ ended), then the continuous cache at its tuned θ and λ where "
             "self-tuning kept one.", "",
             "| entries | novels | index | test tokens | LM | **kNN-LM, default** (λ end) | kNN-LM, own settings, fixed λ (k, λ, T) | "
             "kNN-LM, tuned on the tuning novels (k, λ, T) | test optimum | search ms/token |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]

    def cell(r, key):
        s = r[key.replace("ppl_", "")]
        ppl = r[key]
        return f"{ppl:.3f} ({(ppl / r['ppl_lm'] - 1) * 100:+.1f}%) ({s['k']}, {s['lambda']:g}, {s['temperature']:g})"

    def default(r):
        if "ppl_default" not in r:
            return "–"
        before = (f"; one adaptive λ0, no table: {r['ppl_before']:.3f}, default {(r['ppl_default'] / r['ppl_before'] - 1) * 100:+.2f}%"
                  if "ppl_before" in r else "")
        c = r.get("cache") or {}
        cache = ("" if not c else f"; the cache: λ {c['lambda']:g}, θ {c['theta']:g}, without it {r['ppl_default_without_cache']:.3f}"
                 if c["lambda"] > 0 else "; no cache: its self-tuning kept none")
        return (f"**{r['ppl_default']:.3f}** ({(r['ppl_default'] / r['ppl_lm'] - 1) * 100:+.1f}%) "
                f"({r['lambda_end']:.2f}{before}{cache})")

    for size, r in points.items():
        lines.append(f"| {r['entries']:,} | {len(r['novels'])} | {r['index']['index']} | {r['test_tokens']:,} | "
                     f"{r['ppl_lm']:.3f} | {default(r)} | {cell(r, 'ppl_own')} | {cell(r, 'ppl_tuned')} | {cell(r, 'ppl_oracle')} | "
                     f"{r['search_ms_per_token']:.2f} |")
    lines += build_lines(cache, points, log) + one_command_lines(cache)
    lines += curve_lines(points) + cost_lines(cache, points, log) + variant_lines(cache) + index_lines(cache)
    (results / "novels.md").write_text("\n".join(lines) + "\n", "utf-8")
    LOG.info("wrote %s", results / "novels.md")


def build_lines(cache: Path, points: dict, log: dict) -> list[str]:
    """The builds: one row per run of each datastore's build, then per datastore the index's
    time against the forward pass's at the bare rate (the part of the whole build it adds)."""
    lines = ["", "## Builds", "", "| datastore | run | started | seconds | tokens | tokens/s | bare forward tokens/s | "
             "ratio | peak RSS MB |", "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    notes = []
    runs = [g for segs in log.get("segments", {}).values() for g in segs if "seconds" in g]
    best = max(runs, key=lambda g: g["bare_tokens_per_s"], default=None)  # the machine at its quietest
    for size, segs in log.get("segments", {}).items():
        for i, g in enumerate(segs):
            if "seconds" not in g:
                continue
            mark = " (from the log)" if g.get("source") else ""
            rss = f"{g['peak_rss_mb']:.0f}" if g.get("peak_rss_mb") else "–"
            lines.append(f"| {size} | {i + 1}{mark} | {g.get('started', '–')} | {g['seconds']:,.0f} | "
                         f"{g['tokens']:,} | {g['tokens_per_s']:.0f} | {g['bare_tokens_per_s']:.0f} | "
                         f"{g['tokens_per_s'] / g['bare_tokens_per_s']:.2f} | {rss} |")
        done = [g for g in segs if "seconds" in g]
        name = points.get(size, {}).get("index", {}).get("index", "-")
        index_json = cache / f"ds-{size}" / "indexes" / name / "index.json"
        if done and index_json.exists():
            tokens = sum(g["tokens"] for g in done)
            bare = best["bare_tokens_per_s"]
            index_s = json.loads(index_json.read_text("utf-8"))["build_seconds"]
            notes.append(f"{size}: {tokens:,} tokens, a forward pass of {tokens / bare:,.0f} s at the best bare rate "
                         f"measured ({bare:.0f} tokens/s, at the start of the run of {best['started']}); "
                         f"its index ({points[size]['index']['factory']}, trained on a sample "
                         f"and filled after the forward pass) {index_s:,.0f} s more, "
                         f"{index_s / (tokens / bare) * 100:.1f}% of the forward pass.")
    lines += ["", "Each run of a build is one row (a stopped build resumes in the next; runs marked *from the log* "
              "were stopped before they saved their record, and their times are the progress bar's in the build's "
              "log).  The bare forward pass is timed on the build's first 8 batches at its start; under other load "
              "on the same cores (other benchmarks ran beside most runs) the ratio compares different moments and "
              "says nothing about the build's overhead: a run alone on the machine shows it.  Peak RSS includes "
              "the pages of keys.npy written through its memory map (file-backed, reclaimable)."]
    if notes:
        lines += ["", "The whole build, index included:", ""] + [f"- {n}" for n in notes]
    return lines


def table(head: list[str], columns: str, align: str, rows: list[str]) -> list[str]:
    """The lines `head` (a title, a paragraph), then a markdown table of `rows`; nothing without rows."""
    return ["", *head, "", columns, align, *rows] if rows else []


def one_command_lines(cache: Path) -> list[str]:
    """Whole runs of one command on a fresh cache (one-command-<size>.json, written from the
    run's `/usr/bin/time -v`): its wall time, its peak RSS and its point's perplexities."""
    lines = []
    for path in sorted(cache.glob("one-command-*.json")):
        r = json.loads(path.read_text("utf-8"))
        p = r["point"]
        lines.append(f"| `{r['command']}` | {r['started']} | {r['wall_seconds'] / 60:.1f} | "
                     f"{r['max_rss_mb']:,.0f} | {p['entries']:,} | {p['ppl_lm']:.3f} | {p['ppl_default']:.3f} | "
                     f"{r.get('beside', '–')} |")
    return table(["## One command, timed", "",
                  "The whole of one command on a fresh cache (nothing built before it: the build, its index, "
                  "self-tuning, the held-out queries and the test), timed by `/usr/bin/time -v`; peak RSS counts the "
                  "pages of the memory-mapped keys it wrote and read:"],
                 "| command | started | minutes | peak RSS MB | entries | LM | kNN-LM, default | beside it on the machine |",
                 "|---|---|---:|---:|---:|---:|---:|---|", lines)


def curve_lines(points: dict) -> list[str]:
    """The size curve: perplexity and the best λ per datastore size, and its plot."""
    rows = sorted(points.values(), key=lambda r: r["entries"])
    if len(rows) < 2:
        return []
    img = plot_curve(rows, HERE.parent / "docs" / "img" / "novels-size-curve.png")
    lines = ["", "## The size curve", "",
             "The datastores are prefixes of one another (the first novel, the first five, all 36), so each point "
             "adds memories to the one before.  λ: the tuned λ (chosen on the tuning novels) and the test optimum's; "
             "the paper finds the best λ grows with the datastore.", "",
             "| entries | LM | kNN-LM, default | kNN-LM, tuned | test optimum | tuned λ | test-optimal λ |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['entries']:,} | {r['ppl_lm']:.3f} | {r.get('ppl_default', float('nan')):.3f} | "
                     f"{r['ppl_tuned']:.3f} | {r['ppl_oracle']:.3f} | {r['tuned']['lambda']:g} | {r['oracle']['lambda']:g} |")
    if img:
        lines += ["", f"![perplexity and the best λ by datastore size](../../docs/img/{img.name})"]
    return lines


def plot_curve(rows: list[dict], out: Path) -> Path | None:
    """Test perplexity (LM, default, tuned, test optimum) and the tuned and test-optimal λ
    against the datastore's entries, as a PNG; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    n = [r["entries"] for r in rows]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(9, 3.6))
    ax.plot(n, [r["ppl_lm"] for r in rows], "k--", label="LM alone")
    for key, label in (("ppl_default", "kNN-LM, default"), ("ppl_tuned", "kNN-LM, λ tuned on tuning novels"),
                       ("ppl_oracle", "kNN-LM, test optimum")):
        if all(key in r for r in rows):
            ax.plot(n, [r[key] for r in rows], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("datastore entries")
    ax.set_ylabel("test perplexity (held-out novels)")
    ax.legend(fontsize=7)
    bx.plot(n, [r["tuned"]["lambda"] for r in rows], marker="o", label="tuned λ")
    bx.plot(n, [r["oracle"]["lambda"] for r in rows], marker="s", label="test-optimal λ")
    bx.set_xscale("log")
    bx.set_xlabel("datastore entries")
    bx.set_ylabel("λ")
    bx.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def disk_mb(folder: Path) -> float:
    """Bytes that `folder`'s files hold on disk (allocated blocks, so sparse files count as written), in MB."""
    return sum(f.stat().st_blocks * 512 for f in folder.rglob("*") if f.is_file()) / 1e6


def cost_lines(cache: Path, points: dict, log: dict) -> list[str]:
    """The cost table: per size, build and index time, disk, the search process's anonymous
    RSS and the speed phase's evaluation and generation ratios."""
    rows = []
    for size, r in points.items():
        speed_path = cache / f"speed-{size}.json"
        sp = json.loads(speed_path.read_text("utf-8")) if speed_path.exists() else None
        segs = [g for g in log.get("segments", {}).get(size, []) if "seconds" in g]
        index_dir = cache / f"ds-{size}" / "indexes" / r["index"]["index"]
        rows.append(f"| {r['entries']:,} | {sum(g['seconds'] for g in segs):,.0f} | "
                    f"{json.loads((index_dir / 'index.json').read_text('utf-8'))['build_seconds']:,.0f} | {(disk_mb(cache / f'ds-{size}') - disk_mb(index_dir.parent) + disk_mb(index_dir)) / 1e3:.2f} | "
                    f"{disk_mb(index_dir):,.0f} | "
                    + (f"{sp['anon_rss_mb']:,.0f} | {sp['eval_ratio']:.2f}x ({sp['tokens_per_s']['eval_knnlm']:.0f} / "
                       f"{sp['tokens_per_s']['eval_lm']:.0f}) | {sp['gen_ratio']:.2f}x ({sp['tokens_per_s']['gen_knnlm']:.1f} / "
                       f"{sp['tokens_per_s']['gen_lm']:.1f}) |" if sp else "– | – | – |")
                    + serve_cells(cache / f"serve-{size}.json"))
    if not rows:
        return []
    return ["", "## Cost as the datastore grows", "",
            "Made by `python benchmarks/bench_novels.py speed --size S --cache CACHE` (evaluation of the first "
            "6,000 characters of each test novel with the datastore's defaults, as `knnlm eval` does, and greedy "
            "generation of 32 tokens from each novel's first 200 characters, one stream, as `KNNLM.generate` does; "
            "interleaved with the base LM in the same process, median of 2).  Build and index seconds are the "
            "runs' wall times on a shared machine (see Builds); RSS: the search process's anonymous resident "
            "memory (model included) after the searches.", "",
            "| entries | build s | index s | datastore and its index, GB on disk | index MB | search process anon RSS MB | "
            "eval tokens/s, kNN-LM / LM | generation tokens/s, kNN-LM / LM | serve, 1 stream | serve, 8 streams |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|", *rows, "",
            "Serve: `python benchmarks/bench_novels.py serve --size S --cache CACHE`: `knnlm serve`'s completion "
            "tokens/s (greedy, 32 tokens each, from the test novels' openings) for one stream and for 8 concurrent "
            "streams (the server batches them), kNN-LM over LM alone on the same server, interleaved, median of 2.",
            "",
            "Each repeat's tokens/s are in results/novels.json (`speed`).  The 10^5 and 10^6 rows were measured "
            "while the 10^7 build and other benchmarks shared the 2 cores: the base LM's own rate moved by up to 2x "
            "between repeats, so their ratios are rough, and their generation ratios (a few tokens/s each) are "
            "noise, not overhead; the 10^7 row ran with the machine to itself, and its build seconds add up runs "
            "that mostly shared the cores (see Builds).  Up to 2 GiB of keys the searcher re-ranks from a float16 "
            "copy in RAM (the 10^6 row's RSS holds its 1.1 GB); larger keys are re-ranked from the memory-mapped "
            "file (the 10^7 row's 12.6 GB)."]


def serve_cells(path: Path) -> str:
    """The serve phase's two ratios as table cells ("–" where it did not run)."""
    if not path.exists():
        return " – | – |"
    sv = json.loads(path.read_text("utf-8"))
    rate = sv["tokens_per_s"]
    return (f" {sv['ratio_1']:.2f}x ({rate['kNN-LM, 1 stream']:.1f} / {rate['LM, 1 stream']:.1f}) |"
            f" {sv['ratio_8']:.2f}x ({rate['kNN-LM, 8 streams']:.1f} / {rate['LM, 8 streams']:.1f}) |")


def variant_lines(cache: Path) -> list[str]:
    """What each option buys: the variants phase's rows (the defaults with one option changed)."""
    lines = []
    for path in sorted(cache.glob("variants-*.json")):
        size, v = path.stem.split("-", 1)[1], json.loads(path.read_text("utf-8"))
        base = v["eval"]["default"]["ppl"]
        for name, e in v["eval"].items():
            g = v["gen"].get(name)
            lm = name.startswith("LM")
            change = "–" if lm else f"{(e['ppl'] / base - 1) * 100:+.2f}%"
            searched = "–" if lm else f"{e['search_rate']:.0%}"
            lines.append(f"| {size} | {name} | {e['ratio']:.2f}x ({e['tokens_per_s']:.0f}) | {e['ppl']:.3f} | "
                         f"{change} | {searched} | "
                         + (f"{g['ratio']:.2f}x ({g['tokens_per_s']:.1f}) |" if g else "– |"))
    return table(["## What each option buys", "",
                  "Made by `python benchmarks/bench_novels.py variants --size S --index F --cache CACHE`: `knnlm "
                  "eval` of the speed phase's test text with the defaults and with one option changed (`--nprobe 8`, "
                  "`--no-rerank`: PQ distances instead of re-ranking from the stored keys, `--pointers 16`: "
                  "RetoMaton, `--adaptive 0.5`: no search where the LM's max p >= 0.5; *PCA 144* and *4 shards*: the "
                  "datastores below, made from this one), and one-stream generation (32 tokens from each test novel's"
                  " opening) for the defaults, pointers, adaptive retrieval, PCA and shards; tokens/s as a ratio of "
                  "the base LM's, interleaved in one process, median of 2; perplexity with every memory mixed, "
                  "against the defaults'.  Rows after *LM, run N* were measured by a later run (`--only NAMES`) "
                  "against that run's own base LM; before measuring, each run reads the keys and index files of the "
                  "datastores it measures once (the page cache of a server answering for a while).  Batched search "
                  "and the memory-mapped keys are part of every row "
                  "(evaluation searches a window's tokens at once; keys over 2 GiB are re-ranked from the file)."],
                 "| size | variant | eval tokens/s vs LM | ppl | vs default | tokens searched | generation tokens/s vs LM |",
                 "|---|---|---:|---:|---:|---:|---:|", lines) + derived_lines(cache)


def derived_lines(cache: Path) -> list[str]:
    """The datastores the variants made from the novels datastore: what each step took, their size."""
    lines = []
    for path in sorted(cache.glob("derived-*.json")):
        size = path.stem.split("-", 1)[1]
        for name, r in json.loads(path.read_text("utf-8")).items():
            if "bytes" not in r:
                continue
            steps = ", ".join(f"{what} {sec:,.0f} s" for what, sec in r["seconds"].items())
            kept = f"; {r['variance_kept']:.1%} of the variance kept" if r.get("variance_kept") else ""
            lines.append(f"| {size} | {name} | {r['what']}{kept} | {r['entries']:,} | {r['dim']} | {r['factory']} | "
                         f"{steps} | {r['bytes'] / r['entries']:,.0f} |")
    return table(["Made from the datastore by the variants phase (`knnlm reduce --pca 144` and `knnlm shard --shards 4` "
                  "do the same), each with the index `knnlm build` picks; bytes per entry on disk, index included:"],
                 "| size | datastore | what | entries | d | index | made in | bytes/entry |",
                 "|---|---|---|---:|---:|---|---|---:|", lines)


def index_lines(cache: Path) -> list[str]:
    """The FAISS configurations measured by the indexes phase, against exact search."""
    lines = []
    for path in sorted(cache.glob("indexes-*.json")):
        size = path.stem.split("-", 1)[1]
        for row in json.loads(path.read_text("utf-8")):
            for n in row["nprobe"]:
                lines.append(f"| {size} | {row['factory']} | {row['train_size']:,} | {row['build_seconds']:,.0f} | "
                             f"{row['bytes_per_entry']:.1f} | {n['nprobe']} | {n['recall']:.3f} | {n['ms_per_token']:.2f} | "
                             f"{n['ppl']:.3f} | {n['ppl_exact']:.3f} | {(n['ppl'] / n['ppl_exact'] - 1) * 100:+.2f}% |")
    return table(["## Index configurations against exact search", "",
                  "Made by `python benchmarks/bench_novels.py indexes --size S --factories F --nprobes 8,32 --cache "
                  "CACHE`: each FAISS configuration trained on its sample and filled with every key, searched at k = "
                  "1024 with re-ranking from the stored keys, against exact search over all entries (one streamed "
                  "pass over the keys) on 2,000 test tokens spread over the test text; perplexity with the settings "
                  "tuned on the tuning novels through that index."],
                 "| size | factory | trained on | build s | index bytes/entry | nprobe | recall of exact top-1024 | "
                 "search ms/token | ppl | ppl, exact search | vs exact |",
                 "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|", lines)


