"""The real default model (SmolLM2-135M) on a small real text (a fixture in tests/data,
so the test needs nothing beside the repository but the model's wheel, fetched once)."""

from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.real_model
ARTICLE = Path(__file__).parent / "data" / "wikitext2-valid-head.txt"  # 2,500 characters of WikiText-2 valid


@pytest.fixture(scope="module")
def real_lm():
    from knnlm.core.model import LM

    return LM.load("smollm2-135m", dtype="float32")


def test_default_model_loads_with_expected_shape(real_lm):
    cfg = real_lm.model.config
    assert (cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers, real_lm.vocab_size) == ("llama", 576, 30, 49152)
    assert real_lm.sites["ffn_input"].path == "model.layers.29.mlp"
    assert real_lm.tokenizer.decode([real_lm.prefix_token_id]) == "<|endoftext|>"
    assert "quantization_config" not in real_lm.model.config.to_dict()


def test_default_model_kNN_LM_on_wikitext(real_lm, tmp_path):
    from knnlm.core.batching import plan_files
    from knnlm.core.datastore import Datastore, build_datastore
    from knnlm.core.index import Searcher, build_index
    from knnlm.run.evaluate import evaluate, score_plan

    text = ARTICLE.read_text(encoding="utf-8")
    src = tmp_path / "article.txt"
    src.write_text(text, encoding="utf-8")
    out = build_datastore(real_lm, [src], tmp_path / "ds", window=256, stride=128, progress=False)[0]
    ds = Datastore(out)
    assert ds.dim == 576 and ds.count == len(real_lm.encode(text)) - 1
    build_index(ds, "Flat", progress=False)
    base = evaluate(real_lm, [src], window=256, stride=128, progress=False)
    assert 5 < base["ppl_lm"] < 100  # a real LM on real English: not a random model (~49152)
    # self-retrieval: the text's own contexts are in the datastore
    s = score_plan(real_lm, plan_files(real_lm, [src], 256, 128, 4096), Searcher(ds), k=1, progress=False)
    assert np.mean(np.exp(s.knn)) > 0.95
    res = evaluate(real_lm, [src], out, k=8, lam=0.25, window=256, stride=128, progress=False)
    assert res["ppl_lm"] == base["ppl_lm"] and res["ppl_knnlm"] < 0.8 * res["ppl_lm"]
