"""The inspector page (knnlm.serve.page) in a real headless browser: Debian's chromium driven
by selenium, against a server on the tiny model, and as the file `knnlm explain --html` writes.
Skipped, with the reason, only where no chromium can be found (scripts/setup.sh installs it)."""

import json
import math
import shutil
import tempfile

import httpx
import numpy as np
import pytest

from knnlm.cli.main import main
from knnlm.run.evaluate import evaluate
from knnlm.run.generate import KNNLM
from knnlm.serve.page import render_page
from knnlm.serve.server import create_app
from knnlm.serve.server import serve_in_thread as running

TEXT = "A kNN language model remembers what it has read. Zorblat the purple engineer sang seventeen songs."
WAIT = 30  # seconds: an upper bound on waiting for the page, never a measured time
MODEL = ["--dtype", "float32", "--device", "cpu"]
WINDOWS = ["--window", "128", "--stride", "64", "--batch-tokens", "512"]  # the text fits one window


def _chromium():
    for browser in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(browser)
        if path:
            return path, shutil.which("chromedriver")
    return None, None


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
    binary, driver = _chromium()
    if binary is None or driver is None:
        pytest.skip("no chromium and chromedriver on this machine (scripts/setup.sh installs them as root)")
    profile = tempfile.mkdtemp(prefix="knnlm-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1000", f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    from selenium.webdriver.chrome.service import Service

    drv = webdriver.Chrome(options=opts, service=Service(driver))
    try:
        yield drv
    finally:
        drv.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def docs_ds(lm, jsonl_corpus, tmp_path_factory):
    from knnlm.core.datastore import Datastore, build_datastore
    from knnlm.core.index import build_index

    out = build_datastore(lm, [jsonl_corpus], tmp_path_factory.mktemp("docs") / "ds", window=32, stride=16,
                          progress=False)[0]
    build_index(Datastore(out), "Flat", progress=False)
    return Datastore(out)


@pytest.fixture(scope="module")
def knn(lm, docs_ds):
    return KNNLM(lm, {"docs": docs_ds.path})


@pytest.fixture(scope="module")
def base(knn):
    with running(create_app(knn, max_queue=4, max_tokens=64, model_name="tiny")) as url:
        yield url


# ---- helpers -------------------------------------------------------------------------
def wait(drv, check, what):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(drv, WAIT).until(lambda d: check(d), message=f"waited for {what}")


def js(drv, script, *args):
    return drv.execute_script(script, *args)


def by_id(drv, i):
    from selenium.webdriver.common.by import By

    return drv.find_element(By.ID, i)


def open_page(drv, url):
    drv.get(url)
    wait(drv, lambda d: js(d, "return document.body.dataset.ready === 'true' || !document.getElementById('error').hidden"),
         "the page to start")


def score_in_page(drv, text, datastore=None):
    """Type `text`, pick the datastore, press Score; returns when the page shows tokens or an error."""
    js(drv, "window.__scored = null; document.getElementById('tokens').replaceChildren();")
    box = by_id(drv, "text")
    js(drv, "arguments[0].value = arguments[1];", box, text)
    if datastore is not None:
        js(drv, "const s = document.getElementById('datastore');"
                "if (![...s.options].some(o => o.value === arguments[0])) s.add(new Option(arguments[0], arguments[0]));"
                "s.value = arguments[0];", datastore)
    by_id(drv, "score-btn").click()
    wait(drv, lambda d: js(d, "return document.querySelectorAll('#tokens .tok').length > 0 "
                              "|| !document.getElementById('error').hidden"), "scores or an error")


def set_knobs(drv, lam=None, log2_t=None, k=None, mode=None):
    if mode is not None:
        js(drv, "const m = document.getElementById('lambda-mode'); m.value = arguments[0];"
                "m.dispatchEvent(new Event('change'));", mode)
    if k is not None:
        js(drv, "const e = document.getElementById('k'); e.value = String(arguments[0]);"
                "e.dispatchEvent(new Event('change'));", k)
    for name, v in (("lambda", lam), ("temperature", log2_t)):
        if v is not None:
            js(drv, "const e = document.getElementById(arguments[0]); e.value = arguments[1];"
                    "e.dispatchEvent(new Event('input'));", name, v)
    js(drv, "return new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));")


def shown_ppl(drv) -> tuple[float, float]:
    return (float(by_id(drv, "ppl-lm").get_attribute("data-value")),
            float(by_id(drv, "ppl-knnlm").get_attribute("data-value")))


def neighbour_rows(drv, panel="detail"):
    return js(drv, f"return [...document.querySelectorAll('#{panel} tr.nb')].map(r => "
                   "({title: r.querySelector('b').textContent, token: r.querySelector('mark').textContent, "
                   "distance: r.querySelector('.distance').textContent, weight: r.querySelector('.weight').textContent}))")


def api_score(base, text, **kw):
    body = {"text": text, "datastore": "docs", "return_neighbors": 8, "return_knn": True, "pointer_threshold": 0,
            "adaptive_threshold": 0, "memory": None, **kw}  # what the page sends
    return httpx.post(base + "/v1/score", json=body, timeout=60)


# ---- the API the page needs ------------------------------------------------------------
def test_score_returns_every_neighbour_to_recompute_p_knn(base, knn, docs_ds):
    """/v1/score with return_knn: each token's k distances and which neighbours predict it give back
    the server's log p_kNN (at its T) and, at any other k and T, knn_target_logprobs's."""
    from knnlm.core.scoring import knn_target_logprobs

    r = api_score(base, TEXT, k=6, knn_temperature=2.0).json()
    s = knn.score(TEXT, datastore="docs", k=6, knn_temperature=2.0)
    assert len(r["tokens"]) == len(s.tokens)
    for t, ts in zip(r["tokens"], s.tokens):
        d = np.array(t["knn"]["distances"], dtype=np.float32)  # each one the float32 the search returned
        hit = np.zeros(6, dtype=bool)
        hit[t["knn"]["hits"]] = True
        lp = knn_target_logprobs(d[None], hit[None].astype(int), np.array([1]), 2.0)[0]
        assert lp == pytest.approx(ts.logprob_knn if ts.logprob_knn is not None else -math.inf, abs=1e-9)
        assert len(d) == 6 and t["logprob_lm"] == pytest.approx(ts.logprob_lm)
    plain = httpx.post(base + "/v1/score", json={"text": TEXT, "datastore": "docs"}).json()
    assert "knn" not in plain["tokens"][0]  # only when asked
    lm_only = httpx.post(base + "/v1/score", json={"text": TEXT, "datastore": None, "return_knn": True}).json()
    assert all(t["knn"] is None for t in lm_only["tokens"])


def test_page_is_served_self_contained(base):
    r = httpx.get(base + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert "<script src" not in html and "<link" not in html and "http://" not in html and "https://" not in html
    assert "default-src 'none'" in r.headers["content-security-policy"]


# ---- the served page ---------------------------------------------------------------------
def test_page_renders_every_token_and_a_click_shows_the_api_neighbours(browser, base):
    open_page(browser, base)
    score_in_page(browser, TEXT, "docs")
    api = api_score(base, TEXT).json()
    spans = js(browser, "return [...document.querySelectorAll('#tokens .tok')].map(s => s.textContent)")
    assert spans == [t["token"] for t in api["tokens"]]
    lm, mix = shown_ppl(browser)
    assert lm == pytest.approx(api["ppl_lm"], rel=1e-9) and mix == pytest.approx(api["ppl"], rel=1e-9)
    i = 7
    by_id(browser, f"t{i}").click()
    rows = neighbour_rows(browser)
    want = api["tokens"][i]["neighbors"]
    assert len(rows) == len(want) > 0
    # the tiny corpus holds every sentence twice: tied neighbours may come in either order
    key = lambda r: (r["distance"], r["weight"], r["token"], r["title"])  # noqa: E731
    assert sorted(map(key, rows)) == sorted(key({**nb, "distance": f"{nb['distance']:.3f}",
                                                 "weight": f"{nb['weight']:.4f}"}) for nb in want)
    # keyboard: the right arrow moves to the next token and shows it
    from selenium.webdriver.common.keys import Keys

    by_id(browser, "tokens").send_keys(Keys.ARROW_RIGHT)
    assert js(browser, "return document.getElementById('tokens').getAttribute('aria-activedescendant')") == f"t{i + 1}"
    assert len(neighbour_rows(browser)) == len(api["tokens"][i + 1]["neighbors"])


def test_documents_view_lists_the_servers_attribution(browser, base):
    open_page(browser, base)
    score_in_page(browser, TEXT, "docs")
    api = api_score(base, TEXT).json()
    by_id(browser, "tab-docs").click()
    shown = js(browser, "return [...document.querySelectorAll('#documents li.doc summary b')].map(b => b.textContent)")
    assert shown == [d["title"] for d in api["documents"]] and shown
    # a document opens to its tokens; a token goes back to the text with its memories
    js(browser, "document.querySelector('#documents li.doc details').open = true")
    button = js(browser, "return document.querySelector('#documents li.doc .toks button')")
    label = button.text
    button.click()
    assert by_id(browser, "view-text").is_displayed()
    i = int(js(browser, "return document.getElementById('tokens').getAttribute('aria-activedescendant')")[1:])
    assert api["documents"][0]["title"] in [r["title"] for r in neighbour_rows(browser)]
    assert json.dumps(api["tokens"][i]["token"]) == label


def test_sliders_give_the_fixed_lambda_evaluation(browser, base, lm, docs_ds, tmp_path):
    """λ, T and a smaller k moved in the page: the perplexity it shows is `evaluate`'s with
    --lambda-mode fixed at those settings, computed from the neighbours it already has."""
    open_page(browser, base)
    score_in_page(browser, TEXT, "docs")
    before = shown_ppl(browser)[1]
    text = tmp_path / "t.txt"
    text.write_text(TEXT, encoding="utf-8")
    k = min(8, int(js(browser, "return Math.max(...[...document.getElementById('k').options]"
                               ".filter(o => !o.text.includes('fetch')).map(o => +o.value))")))
    set_knobs(browser, mode="fixed", lam=0.6, log2_t=1, k=k)
    lm_ppl, mix_ppl = shown_ppl(browser)
    res = evaluate(lm, [text], docs_ds.path, index="flat", k=k, lam=0.6, temperature=2.0, window=128, stride=64,
                   progress=False, lambda_mode="fixed")
    assert lm_ppl == pytest.approx(res["ppl_lm"], rel=1e-6)
    assert mix_ppl == pytest.approx(res["ppl_knnlm"], rel=1e-6) and mix_ppl != pytest.approx(before, rel=1e-6)
    assert by_id(browser, "lambda-val").text == "0.60"


def _confidence_table(lm) -> dict:
    """A table of λ by distance and the LM's log max p, its confidence edge at the median of
    the LM's confidences on TEXT (so that both columns are read)."""
    import torch

    _, logits = lm.forward(torch.tensor([lm.encode(TEXT)]), [], logits=True)
    edge = float(np.median(torch.log_softmax(logits[0].float(), -1).max(-1).values.numpy()))
    return {"edges": [0.1, 3.0], "lambdas": [[0.9, 0.6], [0.5, 0.2], [0.1, 0.0]], "confidence_edges": [edge]}


@pytest.mark.parametrize("reads_confidence", [False, True], ids=["distance", "distance+confidence"])
def test_a_datastores_lambda_by_distance_table_is_recomputed_too(browser, lm, docs_ds, tmp_path, reads_confidence):
    """A datastore with a λ-by-distance table (each position's base λ from its nearest
    distance, and the LM's confidence when the table reads it, adapting around it): the page
    shows the server's and `evaluate`'s numbers, and a λ moved by hand is one λ for every
    position again."""
    path = tmp_path / "ds"
    shutil.copytree(docs_ds.path, path)
    from knnlm.core.datastore import Datastore

    table = _confidence_table(lm) if reads_confidence else {"edges": [0.1, 3.0], "lambdas": [0.9, 0.5, 0.1]}
    Datastore(path).record_settings({"k": 16, "lambda": 0.4, "temperature": 2.0, "how": "test",
                                     "lambda_by_distance": table})
    text = tmp_path / "t.txt"
    text.write_text(TEXT, encoding="utf-8")
    with running(create_app(KNNLM(lm, {"tabled": path}), max_queue=4, model_name="tiny")) as url:
        open_page(browser, url)
        score_in_page(browser, TEXT, "tabled")
        api = api_score(url, TEXT, datastore="tabled").json()
    assert api["lambda_by_distance"] == table and api["lambda_mode"] == "adaptive"
    res = evaluate(lm, [text], path, index="flat", window=128, stride=64, progress=False)
    assert res["lambda_by_distance"] == table
    lm_ppl, mix_ppl = shown_ppl(browser)
    assert mix_ppl == pytest.approx(api["ppl"], rel=1e-9) and mix_ppl == pytest.approx(res["ppl_knnlm"], rel=1e-6)
    assert by_id(browser, "by-distance").is_selected()
    set_knobs(browser, mode="fixed")
    fixed = evaluate(lm, [text], path, index="flat", window=128, stride=64, progress=False, lambda_mode="fixed")
    assert shown_ppl(browser)[1] == pytest.approx(fixed["ppl_knnlm"], rel=1e-6)
    set_knobs(browser, lam=0.4)  # by hand: the table is off
    assert not by_id(browser, "by-distance").is_selected()
    one = evaluate(lm, [text], path, index="flat", lam=0.4, window=128, stride=64, progress=False, lambda_mode="fixed")
    assert shown_ppl(browser)[1] == pytest.approx(one["ppl_knnlm"], rel=1e-6) != fixed["ppl_knnlm"]


def test_generation_streams_lm_and_knnlm_side_by_side(browser, base, knn):
    open_page(browser, base)
    by_id(browser, "tab-gen").click()
    js(browser, "document.getElementById('prompt').value = 'Memory helps';"
                "document.getElementById('max-tokens').value = '10';")
    js(browser, "window.__chunks = 0; const g = document.getElementById('gen-knn');"
                "new MutationObserver(() => window.__chunks++).observe(g, {childList: true});")
    by_id(browser, "gen-btn").click()
    wait(browser, lambda d: js(d, "return document.getElementById('gen-lm').dataset.done === 'true' && "
                                  "document.getElementById('gen-knn').dataset.done === 'true' || "
                                  "!document.getElementById('error').hidden"), "both generations")
    assert by_id(browser, "error").get_attribute("hidden") is not None
    lm_text = js(browser, "return [...document.querySelectorAll('#gen-lm .gtok')].map(s => s.textContent).join('')")
    knn_text = js(browser, "return [...document.querySelectorAll('#gen-knn .gtok')].map(s => s.textContent).join('')")
    assert lm_text == knn.generate("Memory helps", 10, datastore=None, temperature=0).text
    assert knn_text == knn.generate("Memory helps", 10, datastore="docs", temperature=0).text
    assert js(browser, "return window.__chunks") >= 2  # token by token, not one block
    first = js(browser, "return document.querySelector('#gen-knn .tok')")
    first.click()
    assert len(neighbour_rows(browser, "gen-detail")) > 0


@pytest.mark.parametrize("case", ["empty", "1 MB", "unknown datastore"])
def test_bad_input_shows_the_servers_error(browser, base, case):
    open_page(browser, base)
    text, ds = {"empty": ("", "docs"), "1 MB": ("x" * (1 << 20), "docs"), "unknown datastore": (TEXT, "nope")}[case]
    score_in_page(browser, text, ds)
    message = api_score(base, text, datastore=ds).json()["error"]["message"]
    assert by_id(browser, "error").text == "error: " + message
    assert js(browser, "return document.querySelectorAll('#tokens .tok').length") == 0
    assert httpx.get(base + "/health").json()["status"] == "ok"
    score_in_page(browser, TEXT, "docs")  # and the page goes on working
    assert js(browser, "return document.querySelectorAll('#tokens .tok').length") > 0
    assert by_id(browser, "error").get_attribute("hidden") is not None


def test_with_api_keys_the_page_asks_for_one(browser, knn):
    with running(create_app(knn, max_queue=4, api_keys=["s3cret"], model_name="tiny")) as url:
        open_page(browser, url)
        js(browser, "sessionStorage.clear()")
        open_page(browser, url)
        assert by_id(browser, "key-form").is_displayed()
        assert by_id(browser, "error").text == "error: missing API key: send the header 'Authorization: Bearer KEY'"
        score_in_page(browser, TEXT, "docs")  # without a key the server refuses the page's call
        assert "missing API key" in by_id(browser, "error").text
        by_id(browser, "api-key").send_keys("wrong")
        by_id(browser, "key-btn").click()
        wait(browser, lambda d: "incorrect API key" in by_id(d, "error").text, "the refusal")
        js(browser, "document.getElementById('api-key').value = ''")
        by_id(browser, "api-key").send_keys("s3cret")
        by_id(browser, "key-btn").click()
        wait(browser, lambda d: js(d, "return document.body.dataset.ready === 'true'"), "the key to be taken")
        assert not by_id(browser, "key-form").is_displayed()
        score_in_page(browser, TEXT, "docs")
        assert js(browser, "return document.querySelectorAll('#tokens .tok').length") > 0


# ---- the file ------------------------------------------------------------------------------
def test_explain_html_file_shows_the_same_numbers_without_a_server(browser, capsys, llama_dir, docs_ds, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT, encoding="utf-8")
    page, res = tmp_path / "page.html", tmp_path / "eval.json"
    args = ["-d", str(docs_ds.path), "--model", str(llama_dir), *MODEL, *WINDOWS, "-k", "8", "--lambda", "0.3",
            "--temperature", "2", "--index", "flat"]
    assert main(["-q", "explain", str(text), "--html", str(page), *args]) == 0
    assert main(["-q", "eval", str(text), "-o", str(res), "--lambda-mode", "fixed", *args]) == 0
    capsys.readouterr()
    want = json.loads(res.read_text())
    html = page.read_text(encoding="utf-8")
    assert "http://" not in html and "https://" not in html and "<script src" not in html
    browser.get(page.as_uri())
    wait(browser, lambda d: js(d, "return document.body.dataset.ready === 'true'"), "the file to load")
    assert js(browser, "return document.querySelectorAll('#tokens .tok').length") == want["tokens"]
    lm_ppl, mix_ppl = shown_ppl(browser)
    assert lm_ppl == pytest.approx(want["ppl_lm"], rel=1e-6) and mix_ppl == pytest.approx(want["ppl_knnlm"], rel=1e-6)
    assert not by_id(browser, "score-form").is_displayed()
    by_id(browser, "t5").click()
    assert len(neighbour_rows(browser)) == 5  # --neighbors' default
    set_knobs(browser, lam=0.0)  # λ = 0: the LM alone
    assert shown_ppl(browser)[1] == pytest.approx(want["ppl_lm"], rel=1e-9)


def test_embedded_data_cannot_close_the_script():
    html = render_page({"model": "m", "score": {"tokens": [{"token": "</script><b>x"}]}})
    assert html.count("</script>") == 2 and "\\u003c/script>" in html




def test_explain_html_refuses_a_memory_decoder(capsys, tmp_path):
    assert main(["-q", "explain", "t.txt", "--html", str(tmp_path / "p.html"), "--memory", "mem"]) == 1
    assert capsys.readouterr().err.strip() == "error: --html shows a datastore's memories: it does not take --memory"
    assert not (tmp_path / "p.html").exists()
