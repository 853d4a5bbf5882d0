"""The demo's data split and its terminal page (the demo itself runs the real model: see README)."""

import json

import pytest

from knnlm.errors import KnnlmError
from knnlm.run.demo import report, split_leads


def test_split_leads_gives_disjoint_articles(tmp_path):
    leads = tmp_path / "leads.jsonl"
    leads.write_text("".join(json.dumps({"title": f"t{i}", "text": f"article {i}"}) + "\n" for i in range(30)))
    files = split_leads(leads, tmp_path / "out", articles=20, heldout=5)
    test = files["test"].read_text().splitlines()
    ds = files["datastore"].read_text().splitlines()
    assert len(test) == 5 and len(ds) == 20 and not set(test) & set(ds)
    split_leads(leads, tmp_path / "out2", articles=20, heldout=5)
    assert (tmp_path / "out2" / "test.jsonl").read_text().splitlines() == test  # same seed, same split
    with pytest.raises(KnnlmError, match="must not exceed"):
        split_leads(leads, tmp_path / "out3", articles=26, heldout=5)


def test_report_shows_each_domain_with_its_own_settings():
    row = {"domain": "new domain: X", "lang": "xx", "datastore_entries": 1000, "test_tokens": 200, "ppl_lm": 40.0,
           "ppl_knnlm": 30.0, "ppl_knnlm_paper_defaults": 33.0,
           "settings": {"k": 64, "lambda": 0.3, "temperature": 4.0}}
    gen = {"prompt": "p", "truth": "t", "lm": "a", "knnlm": "b", "next_token": " t", "p_next_lm": 0.01,
           "p_next_knnlm": 0.2}
    page = report({"model": "m", "model_dtype": "bfloat16", "domains": [row], "generation": gen}, {"xx": []})
    line = next(x for x in page.splitlines() if x.startswith("new domain: X"))
    assert "40.00" in line and "30.00 (-25.0%)" in line and "k=64 λ=0.30 T=4" in line and "33.00" in line
    assert "kNN-LM 0.200" in page
