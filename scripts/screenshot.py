"""Regenerate the README's picture of the inspector page (docs/img/inspector.png).

    python scripts/screenshot.py                       # the demo's Spanish datastore (`knnlm demo` first)
    python scripts/screenshot.py --datastore /tmp/knnlm-demo/es-es/datastore-300   # another --workdir
    python scripts/screenshot.py --datastore DS --text article.txt --out shot.png

Serves the default model with the datastore on 127.0.0.1 (`knnlm serve`'s app, in this
process), opens the page in Debian's headless chromium (scripts/setup.sh installs it),
scores the text, picks the token the datastore helped most and saves the window.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "knnlm-demo"  # `knnlm demo`'s default --workdir, run from the repository


def browser(width: int, height: int):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not binary or not driver:
        sys.exit("error: needs chromium and chromedriver (scripts/setup.sh installs them)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--hide-scrollbars", f"--window-size={width},{height}",
                 f"--user-data-dir={tempfile.mkdtemp(prefix='knnlm-shot-')}"):
        opts.add_argument(flag)
    return webdriver.Chrome(options=opts, service=Service(driver))


def default_text(datastore: Path, articles: int) -> str:
    """The first held-out articles next to a `knnlm demo` datastore (corpus/test.jsonl)."""
    test = datastore.parent / "corpus" / "test.jsonl"
    if not test.exists():
        sys.exit(f"error: no {test}: give --text")
    rows = [json.loads(line) for line in test.read_text(encoding="utf-8").splitlines() if line.strip()]
    return "\n\n".join(r["text"] for r in rows[:articles])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datastore", type=Path, default=DEMO / "es-es" / "datastore-300")
    ap.add_argument("--name", default="es-wiki", help="the datastore's name in the page")
    ap.add_argument("--text", type=Path, help="text to score (default: the demo's first held-out articles)")
    ap.add_argument("--articles", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "inspector.png")
    ap.add_argument("--size", default="1400x1000")
    args = ap.parse_args()

    from knnlm import KNNLM
    from knnlm.serve.server import create_app, serve_in_thread

    if not (args.datastore / "meta.json").exists():
        sys.exit(f"error: no datastore at {args.datastore} (run `knnlm demo` first)")
    text = args.text.read_text(encoding="utf-8") if args.text else default_text(args.datastore, args.articles)
    knn = KNNLM.load(datastores={args.name: args.datastore})
    width, height = (int(x) for x in args.size.split("x"))
    drv = browser(width, height)
    try:
        with serve_in_thread(create_app(knn)) as url:
            drv.get(url)
            wait(drv, "return document.body.dataset.ready === 'true'")
            drv.execute_script("document.getElementById('text').value = arguments[0];"
                               "document.getElementById('datastore').value = arguments[1];", text, args.name)
            drv.execute_script("document.getElementById('score-btn').click()")
            wait(drv, "return document.querySelectorAll('#tokens .tok').length > 0 "
                      "|| !document.getElementById('error').hidden")
            r = httpx.post(url + "/v1/score", json={"text": text, "datastore": args.name}, timeout=300).json()
            gains = [(t["logprob"] or -1e9) - (t["logprob_lm"] or -1e9) if i > 8 else -1e9
                     for i, t in enumerate(r["tokens"])]
            best = max(range(len(gains)), key=gains.__getitem__)
            drv.execute_script("document.getElementById('t' + arguments[0]).click();"
                               "document.getElementById('tokens').scrollTop = 0; window.scrollTo(0, 0);", best)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            drv.save_screenshot(str(args.out))
    finally:
        drv.quit()
    print(f"wrote {args.out} ({len(r['tokens'])} tokens scored; showing {r['tokens'][best]['token']!r}, "
          f"perplexity {r['ppl_lm']:.2f} -> {r['ppl']:.2f})")


def wait(drv, script: str, seconds: float = 300) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(drv, seconds).until(lambda d: d.execute_script(script))


if __name__ == "__main__":
    main()
