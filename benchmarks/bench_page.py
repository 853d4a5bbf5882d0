"""How responsive the inspector page stays on a long text: load, a λ move, a T move, a k
change, a click and an arrow key, timed inside headless chromium.

    python benchmarks/bench_page.py                            # 10,000 tokens x k=1024, synthetic scores
    python benchmarks/bench_page.py --tokens 2000 --k 256
    python benchmarks/bench_page.py --page es-test.html        # a page `knnlm explain --html` wrote

The synthetic page has the shape `knnlm explain --html` writes (random distances, about one
neighbour in ten predicting its token, 8 neighbours with text per token); the numbers are
times measured in one run on this machine, the page's own work (JavaScript, style, layout)
up to the next frames, not a model's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from screenshot import browser  # noqa: E402  (the same chromium flags)

WORDS = "el la de que en un una los por con para como más pero sus fue ser año entre".split()


def synthetic(tokens: int, k: int, neighbors: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    d = np.sort(rng.gamma(4.0, 4.0, size=(tokens, k)).astype(np.float32), axis=1)
    short = d.astype(str).astype(np.float64).tolist()
    hits = rng.random((tokens, k)) < 0.1
    toks = []
    for i in range(tokens):
        word = " " + WORDS[rng.integers(len(WORDS))]
        nbs = [{"datastore": "synthetic", "entry": int(rng.integers(1 << 20)), "document": int(rng.integers(300)),
                "title": f"Artículo {int(rng.integers(300))}", "source": "datastore.jsonl", "offset": 12,
                "distance": short[i][j], "weight": 1.0 / neighbors, "token": word, "token_id": 1,
                "context": " ".join(WORDS[x] for x in rng.integers(len(WORDS), size=24)), "after": " y más"}
               for j in range(neighbors)]
        toks.append({"token": word, "id": 1, "logprob": None, "logprob_lm": float(-rng.gamma(2.0, 1.5)),
                     "logprob_knn": None, "knn": {"distances": short[i], "hits": np.flatnonzero(hits[i]).tolist()},
                     "neighbors": nbs})
    return {"model": "synthetic", "source": f"{tokens} synthetic tokens",
            "score": {"object": "score", "datastore": "synthetic", "lambda": 0.25, "lambda_mode": "adaptive", "k": k,
                      "knn_temperature": 2.0, "tokens": toks}}


TIMED = """
const [what, arg, done] = [arguments[0], arguments[1], arguments[arguments.length - 1]];
const frames = () => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
const t0 = performance.now();
if (what === 'input' || what === 'change') {
  const e = document.getElementById(arg[0]); e.value = arg[1]; e.dispatchEvent(new Event(what));
} else if (what === 'click') {
  document.getElementById(arg).click();
} else if (what === 'key') {
  document.getElementById('tokens').dispatchEvent(new KeyboardEvent('keydown', {key: arg, bubbles: true}));
}
frames().then(() => done(performance.now() - t0));
"""


def measure(page: Path, repeat: int) -> list[tuple[str, float]]:
    from selenium.webdriver.support.ui import WebDriverWait

    drv = browser(1400, 1000)
    try:
        drv.set_script_timeout(120)
        t0 = time.perf_counter()
        drv.get(page.as_uri())
        WebDriverWait(drv, 300, poll_frequency=0.01).until(
            lambda d: d.execute_script("return document.body.dataset.ready === 'true'"))
        load = (time.perf_counter() - t0) * 1000
        drv.execute_script("return new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
        n = drv.execute_script("return document.querySelectorAll('#tokens .tok').length")
        ks = drv.execute_script("return [...document.getElementById('k').options].map(o => o.value)")
        rows = [(f"load the page and show {n} tokens (until ready)", load)]
        steps = [("move λ (fixed mode: colours + perplexity)", "input", lambda i: ["lambda", str(0.3 + 0.01 * i)]),
                 ("move T (p_kNN of every token again)", "input", lambda i: ["temperature", str(1 + 0.25 * i)]),
                 ("change k", "change", lambda i: ["k", ks[-2 - i % 2]]),
                 ("click a token (its memories)", "click", lambda i: f"t{(i * 997) % n}"),
                 ("arrow key to the next token", "key", lambda i: "ArrowRight")]
        drv.execute_script("const m = document.getElementById('lambda-mode'); m.value = 'fixed';"
                           "m.dispatchEvent(new Event('change'))")
        for label, what, arg in steps:
            times = [drv.execute_async_script(TIMED, what, arg(i)) for i in range(repeat)]
            rows.append((label, float(np.median(times))))
        drv.execute_script("const m = document.getElementById('lambda-mode'); m.value = 'adaptive';"
                           "m.dispatchEvent(new Event('change'))")
        times = [drv.execute_async_script(TIMED, "input", ["lambda", str(0.2 + 0.01 * i)]) for i in range(repeat)]
        rows.append(("move λ (adaptive mode)", float(np.median(times))))
        return rows
    finally:
        drv.quit()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=10_000)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--neighbors", type=int, default=8)
    ap.add_argument("--page", type=Path, help="time this page file instead of a synthetic one")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    page = args.page
    if page is None:
        from knnlm.serve.page import render_page

        page = Path(tempfile.mkdtemp(prefix="knnlm-bench-page-")) / "page.html"
        page.write_text(render_page(synthetic(args.tokens, args.k, args.neighbors)), encoding="utf-8")
        what = f"synthetic, {args.tokens} tokens x k={args.k}, {args.neighbors} neighbours with text"
    else:
        what = str(page)
    print(f"page: {what}, {page.stat().st_size / 1e6:.1f} MB")
    print("| step | median ms |\n|---|---:|")
    for label, ms in measure(page, args.repeat):
        print(f"| {label} | {ms:.0f} |")


if __name__ == "__main__":
    main()
