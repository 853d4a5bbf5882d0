"""A memory decoder at inference: lambda = 0 is the base LM exactly; eval, tune, explain,
score, generation (KV cache) and continuous batching with it; another model of the same
tokenizer takes it, one of another tokenizer refuses it; bad input is one `error:` line."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_bad_input import WINDOWS, fails, model_args, snapshot, succeeds
from tiny import TEXT

from knnlm import RetrievalSettings
from knnlm.core.batching import plan_files
from knnlm.core.datastore import Datastore, build_datastore
from knnlm.core.index import build_index
from knnlm.core.model import LM
from knnlm.errors import KnnlmError
from knnlm.memory.decoder import MemoryDecoder
from knnlm.memory.mix import mix_memory
from knnlm.memory.targets import TargetSettings, build_targets
from knnlm.memory.train import TrainConfig, train_decoder
from knnlm.run.batch import BatchGenerator
from knnlm.run.evaluate import evaluate, score_plan
from knnlm.run.generate import KNNLM


@pytest.fixture(scope="module")
def mem_dir(lm, tmp_path_factory) -> Path:
    """A 1-layer decoder of the tiny llama, trained a few steps on 8 documents."""
    sents = [s.strip() + "." for s in TEXT.split(".") if s.strip()]
    root = tmp_path_factory.mktemp("meminf")
    p = root / "docs.jsonl"
    p.write_text("".join(json.dumps({"title": f"d{i}", "text": s}) + "\n" for i, s in enumerate(sents[:8])))
    build_datastore(lm, [p], root / "ds", window=32, stride=16, batch_tokens=128, progress=False)
    build_index(Datastore(root / "ds"), "Flat", progress=False)
    build_targets(root / "ds", root / "t", TargetSettings(keep=8), retrieval=RetrievalSettings(k=8, temperature=4.0),
                  progress=False)
    cfg = TrainConfig(batch_size=4, seq_len=16, heldout=0.2, lr=3e-3, epochs=3)
    return train_decoder(lm, root / "ds", root / "t", root / "mem", layers=1, config=cfg, progress=False)


@pytest.fixture(scope="module")
def knn(lm, datastore, mem_dir) -> KNNLM:
    return KNNLM(lm, {"ds": datastore.path}, memories={"mem": mem_dir}, lam=0.3, k=8, knn_temperature=2.0,
                 memory_lambda=0.4)


def test_lambda_zero_is_the_base_lm_exactly(lm, corpus, datastore, mem_dir, knn):
    mem = MemoryDecoder.load_for(lm, mem_dir)
    plan = plan_files(lm, [corpus], 32, 16, 128)
    s = score_plan(lm, plan, memory=mem, progress=False)
    assert np.array_equal(mix_memory(s.lm, s.memory, 0.0), s.lm)
    assert not np.allclose(mix_memory(s.lm, s.memory, 0.3), s.lm)
    res = evaluate(lm, [corpus], memory=mem_dir, memory_lambda=0.0, window=32, stride=16, batch_tokens=128,
                   progress=False)
    assert res["ppl_memory"] == res["ppl_lm"]
    sc = knn.score(TEXT[:80], datastore=None, memory_lambda=0.0)
    assert all(t.logprob == t.logprob_lm for t in sc.tokens)
    assert sc.settings == {"datastore": None, "memory": "mem", "memory_lambda": 0.0}
    nt = knn.next_token_distribution(TEXT[:40], datastore=None, memory_lambda=0.0)
    assert torch.equal(nt.mix, nt.lm)
    nt = knn.next_token_distribution(TEXT[:40], datastore=None)
    assert not torch.allclose(nt.mix, nt.lm)
    with knn.disabled():
        assert knn.score(TEXT[:80]).settings == {"datastore": None}


def test_eval_with_datastore_and_memory(lm, corpus, datastore, mem_dir):
    res = evaluate(lm, [corpus], datastore=datastore.path, k=8, lam=0.3, temperature=2.0, memory=mem_dir,
                   memory_lambda=0.4, window=32, stride=16, batch_tokens=128, progress=False)
    assert {"ppl_lm", "ppl_knnlm", "ppl_memory", "ppl_knnlm_memory"} <= res.keys()
    assert res["ppl_knnlm_memory"] != res["ppl_knnlm"] and res["memory_layers"] == 1
    zero = evaluate(lm, [corpus], datastore=datastore.path, k=8, lam=0.3, temperature=2.0, memory=mem_dir,
                    memory_lambda=0.0, window=32, stride=16, batch_tokens=128, progress=False)
    assert zero["ppl_knnlm_memory"] == zero["ppl_knnlm"]


def test_score_equals_the_mixture_of_the_parts(knn):
    """log p = log(.4 p_mem + .6 (.3 p_kNN + .7 p_LM)) for every token."""
    sc = knn.score(TEXT[:80])
    for t in sc.tokens:
        knnlm = np.logaddexp(np.log(0.3) + t.logprob_knn, np.log(0.7) + t.logprob_lm)
        assert t.logprob == pytest.approx(np.logaddexp(np.log(0.4) + t.logprob_memory, np.log(0.6) + knnlm), abs=1e-5)


@pytest.mark.parametrize("name", ["ds", None])
def test_top_logprobs_are_those_of_the_mixture_with_the_decoder(knn, name):
    """score's top_logprobs at each position are the most likely tokens of p = .4 p_mem + .6 p_base,
    the distribution the next-token call gives after the same prefix (not p_base's)."""
    sc = knn.score(TEXT[:60], datastore=name, top_logprobs=4)
    moved = 0
    for i in range(0, len(sc.tokens), 3):
        nt = knn.next_token_distribution(sc.ids[: i + 1], datastore=name)
        top = torch.topk(nt.mix, 4)
        assert sorted(sc.tokens[i].top.values()) == pytest.approx(sorted(top.values.tolist()), abs=1e-4)
        assert sc.tokens[i].top.keys() == {knn.lm.decode([t]) for t in top.indices.tolist()}
        base = torch.topk(knn.next_token_distribution(sc.ids[: i + 1], datastore=name, memory_lambda=0.0).mix, 4)
        moved += not np.allclose(top.values.numpy(), base.values.numpy(), atol=1e-3)
    assert moved > 0  # the decoder changes the top tokens' log-probs


@pytest.mark.parametrize("name", ["ds", None])
def test_kv_cached_generation_scores_like_a_full_pass(knn, name):
    g = knn.generate("The quick brown", max_new_tokens=8, datastore=name, ignore_eos=True)
    full = knn.score(g.prompt_ids + g.ids, datastore=name)
    for t, f in zip(g.tokens, full.tokens[-len(g.tokens):]):
        assert t.id == f.id and t.logprob == pytest.approx(f.logprob, abs=1e-4)


def test_batched_generations_with_decoders_equal_their_solo_runs(knn):
    """Rows with and without the decoder, with and without the datastore, joining late:
    each row's tokens and scores equal its solo run."""
    specs = [dict(datastore="ds"), dict(datastore=None), dict(datastore="ds", memory=None),
             dict(datastore=None, memory=None), dict(datastore=None, memory_lambda=0.9),
             dict(datastore="ds", temperature=0.8, seed=3)]
    prompts = ["The quick brown", "A kNN language", "Zorblat the purple engineer", "Memory helps", "The lazy",
               "Rare words such as"]
    solo = [knn.generate(p, max_new_tokens=6, ignore_eos=True, **o) for p, o in zip(prompts, specs)]
    batch = BatchGenerator(knn, max_batch=4)
    events = {i: [] for i in range(len(prompts))}
    todo = list(range(len(prompts)))
    while todo or len(batch):
        while todo and batch.has_room():
            i = todo.pop(0)
            events[i] += batch.add(i, knn.prepare(prompts[i], max_new_tokens=6, ignore_eos=True, **specs[i]))
        for i, evs in batch.step().items():
            events[i] += evs
    for i, g in enumerate(solo):
        toks = [e.token for e in events[i] if e.token is not None]
        assert [t.id for t in toks] == g.ids, i
        assert np.allclose([t.logprob for t in toks], [t.logprob for t in g.tokens], atol=1e-4), i
    many = knn.generate_many(prompts[:3], max_new_tokens=5, ignore_eos=True, datastore=None)
    assert [g.ids for g in many] == [knn.generate(p, 5, ignore_eos=True, datastore=None).ids for p in prompts[:3]]


def test_a_decoder_plugs_into_another_model_of_its_tokenizer(mem_dir, model_dirs, corpus, capsys):
    gpt2 = LM.load(str(model_dirs["gpt2"]), dtype="float32")
    res = evaluate(gpt2, [corpus], memory=mem_dir, memory_lambda=0.5, window=32, stride=16, batch_tokens=128,
                   progress=False)
    assert res["ppl_memory"] != res["ppl_lm"]
    k = KNNLM(gpt2, memories={"m": mem_dir})
    assert len(k.generate("The quick", max_new_tokens=3, ignore_eos=True).tokens) == 3
    capsys.readouterr()  # the loads' progress bars
    err = fails(capsys, ["eval", corpus, "--memory", mem_dir, *model_args(model_dirs["qwen2"]), *WINDOWS])
    assert "has another tokenizer" in err and str(mem_dir) in err and str(model_dirs["qwen2"]) in err


# ---- the command line ------------------------------------------------------------------
def test_commands_take_a_memory_decoder(mem_dir, datastore, corpus, llama_dir, tmp_path, capsys):
    out = succeeds(capsys, ["eval", corpus, "--memory", mem_dir, "--memory-lambda", "0.3", *model_args(llama_dir),
                            *WINDOWS])
    assert "ppl LM + memory" in out
    own = succeeds(capsys, ["eval", corpus, "--memory", mem_dir, "--memory-lambda", "0.3", "--dtype", "float32",
                            *WINDOWS])  # no --model, no datastore: the decoder's base model (the tiny llama)
    assert own.split("tokens/s")[0] == out.split("tokens/s")[0]  # the same perplexities (tokens/s aside)
    out = succeeds(capsys, ["tune", corpus, "--memory", mem_dir, "-d", datastore.path, "-k", "8", "-o",
                            tmp_path / "tune.json", *model_args(llama_dir), *WINDOWS])
    res = json.loads((tmp_path / "tune.json").read_text())
    assert "best ppl kNN-LM + memory" in out and res["lm"]["grid"][0] == {"lambda": 0.0, "ppl": res["lm"]["ppl_base"]}
    out = succeeds(capsys, ["explain", corpus, "--memory", mem_dir, "--top", "3", "-o", tmp_path / "x.md",
                            *model_args(llama_dir), *WINDOWS])
    assert out.count("\n|") >= 4 and len(json.loads((tmp_path / "x.json").read_text())) == 3
    out = succeeds(capsys, ["generate", "The quick", "--memory", mem_dir, "--max-new-tokens", "3", "--json",
                            *model_args(llama_dir)])
    assert json.loads(out)["memory"] == mem_dir.name


def damage(mem: Path, case: str) -> None:
    if case == "no memory.json":
        (mem / "memory.json").unlink()
    elif case == "memory.json garbage":
        (mem / "memory.json").write_text("{not json")
    elif case == "memory.json of something else":
        (mem / "memory.json").write_text(json.dumps({"kind": "datastore"}))
    elif case == "weights truncated":
        w = mem / "model.safetensors"
        w.write_bytes(w.read_bytes()[:100])
    elif case == "weights missing":
        (mem / "model.safetensors").unlink()
    elif case == "config missing":
        (mem / "config.json").unlink()


@pytest.mark.parametrize("case, message", [
    ("missing", "memory decoder not found"),
    ("no memory.json", "not a memory decoder (no memory.json)"),
    ("memory.json garbage", "corrupted memory.json"),
    ("memory.json of something else", "corrupted memory.json"),
    ("weights truncated", "corrupted memory decoder"),
    ("weights missing", "corrupted memory decoder"),
    ("config missing", "corrupted memory decoder"),
])
def test_missing_or_corrupted_decoder(case, message, mem_dir, corpus, llama_dir, tmp_path, capsys):
    mem = tmp_path / "mem"
    if case != "missing":
        shutil.copytree(mem_dir, mem)
        damage(mem, case)
    before = snapshot(mem) if mem.exists() else None
    for argv in (["eval", corpus, *WINDOWS], ["generate", "The quick", "--max-new-tokens", "2"]):
        err = fails(capsys, [*argv, "--memory", mem, "-o" if argv[0] == "eval" else "--seed",
                             tmp_path / "r.json" if argv[0] == "eval" else "1", *model_args(llama_dir)])
        assert message in err and str(mem) in err
    assert not (tmp_path / "r.json").exists()
    assert (snapshot(mem) if mem.exists() else None) == before


@pytest.mark.parametrize("argv", [
    ["eval", "CORPUS", *WINDOWS, "--memory", "MEM", "--memory-lambda", "1.5"],
    ["eval", "CORPUS", *WINDOWS, "--memory", "MEM", "--memory-lambda", "-0.5"],
    ["generate", "The", "--memory", "MEM", "--memory-lambda", "2"],
    ["tune", "CORPUS", *WINDOWS, "--memory", "MEM", "--lambdas", "0.5,1.2"],
    ["explain", "CORPUS", *WINDOWS, "--memory", "MEM", "--memory-lambda", "7"],
])
def test_memory_lambda_outside_0_1(argv, mem_dir, corpus, llama_dir, capsys):
    argv = [{"CORPUS": corpus, "MEM": mem_dir}.get(a, a) for a in argv]
    assert "memory lambda must be in [0, 1]" in fails(capsys, [*argv, *model_args(llama_dir)])


def test_python_api_refuses_bad_memory_settings(knn, lm):
    with pytest.raises(KnnlmError, match=r"memory lambda must be in \[0, 1\], got 1.1"):
        knn.generate("The", 2, memory_lambda=1.1)
    with pytest.raises(KnnlmError, match="unknown memory decoder 'nope'"):
        knn.score("The quick", memory="nope")
    with pytest.raises(KnnlmError, match="default memory decoder 'x' is not loaded"):
        KNNLM(lm, default_memory="x")


def test_server_takes_a_memory_decoder_per_request(knn):
    import httpx

    from knnlm.serve.server import create_app, serve_in_thread

    with serve_in_thread(create_app(knn, max_queue=4, max_tokens=16, model_name="tiny", max_batch=4)) as url:
        text = TEXT[:60]
        off = httpx.post(url + "/v1/score", json={"text": text, "datastore": None, "memory": None}).json()
        zero = httpx.post(url + "/v1/score", json={"text": text, "datastore": None, "memory_lambda": 0.0}).json()
        on = httpx.post(url + "/v1/score", json={"text": text, "datastore": None, "memory": "mem"}).json()
        assert json.dumps(off["tokens"]) != json.dumps(on["tokens"])
        assert [t["logprob"] for t in zero["tokens"]] == [t["logprob"] for t in off["tokens"]]
        body = {"prompt": "The quick", "max_tokens": 4, "temperature": 0, "datastore": None, "memory": "mem"}
        r = httpx.post(url + "/v1/completions", json=body).json()
        assert r["choices"][0]["text"] == knn.generate("The quick", 4, datastore=None, memory="mem").text
        r = httpx.post(url + "/v1/completions", json={**body, "memory": "nope"})
        assert r.status_code == 404 and "unknown memory decoder 'nope'" in r.json()["error"]["message"]
        r = httpx.post(url + "/v1/completions", json={**body, "memory_lambda": 1.5})
        assert r.status_code == 400
