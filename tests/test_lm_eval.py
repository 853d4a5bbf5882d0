"""A real lm-evaluation-harness run (its `local-completions` model, through HTTP) against
`knnlm serve` on a tiny random model: a two-document multiple-choice task and a
two-document generation task, both from local JSONL files (no hub).  The log-likelihoods
lm-eval reports must be the kNN-LM's own, KNNLM.score's on the same token ids."""

import json
import math

import pytest

from knnlm.run.generate import KNNLM
from knnlm.serve.server import create_app, serve_in_thread

DOCS = [
    {"context": "The quick brown fox jumps over the lazy", "choices": [" dog", " fjord", " graphite"], "answer": 0},
    {"context": "Memory helps the model predict rare words such as", "choices": [" the", " zephyr"], "answer": 1},
]
MC_TASK = """task: tiny_cloze
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
GEN_TASK = """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 4
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
ROLLING_TASK = """task: tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{context}}}}"
metric_list:
  - metric: word_perplexity
"""


@pytest.fixture
def task_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # no hub: the data are local files
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "tiny_cloze.yaml").write_text(MC_TASK.format(data=data))
    (tmp_path / "tiny_gen.yaml").write_text(GEN_TASK.format(data=data))
    (tmp_path / "tiny_ppl.yaml").write_text(ROLLING_TASK.format(data=data))
    return tmp_path


def test_lm_eval_scores_through_the_server(lm, datastore, llama_dir, task_dir, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    knn = KNNLM(lm, {"text": datastore.path}, lam=0.6, k=8)  # the server's defaults reach lm-eval
    monkeypatch.setenv("OPENAI_API_KEY", "eval-key")  # what local-completions sends as its bearer token
    app = create_app(knn, model_name="tiny", api_keys=["eval-key"])
    with serve_in_thread(app) as url:
        out = lm_eval.simple_evaluate(
            model="local-completions",
            model_args={"base_url": url + "/v1/completions", "model": "tiny", "tokenizer_backend": "huggingface",
                        "tokenizer": str(llama_dir), "batch_size": 2, "max_retries": 1},
            tasks=["tiny_cloze", "tiny_gen", "tiny_ppl"], task_manager=TaskManager(include_path=str(task_dir)),
            log_samples=True, bootstrap_iters=0)
    samples = {s["doc_id"]: s for s in out["samples"]["tiny_cloze"]}
    assert sorted(samples) == [0, 1]
    tok = lm.tokenizer
    correct = []
    for i, doc in enumerate(DOCS):
        ctx = tok(doc["context"], add_special_tokens=False)["input_ids"]
        mine = []
        for choice in doc["choices"]:  # lm-eval's request: context + continuation ids, scored from the context on
            ids = tok(doc["context"] + choice, add_special_tokens=False)["input_ids"]
            mine.append(sum(t.logprob for t in knn.score(ids).tokens[len(ctx) - 1:]))
        theirs = [r[0] for r in samples[i]["filtered_resps"]]
        assert theirs == pytest.approx(mine, abs=1e-6)
        correct.append(max(range(len(mine)), key=mine.__getitem__) == doc["answer"])
    assert out["results"]["tiny_cloze"]["acc,none"] == pytest.approx(sum(correct) / 2)
    # generation: lm-eval's answer is the server's greedy completion, cut at its stop string
    for s in out["samples"]["tiny_gen"]:
        ids = tok(DOCS[s["doc_id"]]["context"], add_special_tokens=False)["input_ids"]
        want = knn.generate(ids, 4, stop=["."]).text
        assert s["resps"][0][0] == want
    assert not math.isnan(out["results"]["tiny_gen"]["exact_match,none"])
    # perplexity (rolling windows): the text after lm-eval's prefix token, as KNNLM.score scores it
    for s in out["samples"]["tiny_ppl"]:
        ids = [tok.eos_token_id] + tok(DOCS[s["doc_id"]]["context"], add_special_tokens=False)["input_ids"]
        assert s["resps"][0][0] == pytest.approx(sum(t.logprob for t in knn.score(ids).tokens), abs=1e-6)
