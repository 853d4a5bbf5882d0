"""Bad input gets a clear error and loses nothing.

Each bad input goes through the `knnlm` command (in-process) where one can reach it: the
command must exit 1 with exactly one `error: ...` line that names the problem, and leave
every existing file as it was.  An interrupted build must never publish a partial
datastore, and resuming it must give the same datastore as an uninterrupted build.
"""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from tiny import TEXT, make_model_dir

import knnlm.core.batching
import knnlm.core.datastore
from knnlm.cli.main import main
from knnlm.core.datastore import Datastore, build_datastore
from knnlm.core.index import build_index
from knnlm.errors import KnnlmError

WINDOWS = ["--window", "32", "--stride", "16", "--batch-tokens", "128"]  # the `datastore` fixture's: 6 batches
BATCHES = 6
DATA_FILES = ("keys.npy", "vals.npy", "tokens.npy", "docs.npy", "docs.jsonl")


def model_args(model_dir) -> list[str]:
    return ["--model", str(model_dir), "--dtype", "float32", "--device", "cpu"]


def fails(capsys, argv: list[str]) -> str:
    """Run `knnlm -q ARGV`: exit status 1 and exactly one `error: ` line, no traceback.
    Returns the message after `error: `."""
    code = main(["-q", *map(str, argv)])  # an uncaught exception fails the test here
    out, err = capsys.readouterr()
    assert code == 1, f"exit status {code}, stderr {err!r}"
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and len(lines[0]) > len("error: ") + 10, err
    return lines[0][len("error: "):]


def succeeds(capsys, argv: list[str]) -> str:
    code = main(["-q", *map(str, argv)])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root (or root itself), by relative path."""
    if root.is_file():
        return {root.name: root.read_bytes()}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same_datastore(a: Path, b: Path) -> None:
    """Byte-identical data files; meta.json equal but for the build's id and time."""
    for name in DATA_FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ma, mb = (json.loads((p / "meta.json").read_text()) for p in (a, b))
    for m in (ma, mb):
        del m["id"], m["created"]
    assert ma == mb
    for p in (a, b):
        assert not p.with_name(p.name + ".partial").exists()


@pytest.fixture
def ds_copy(datastore, tmp_path) -> Path:
    """A private copy of the session datastore (tiny llama, Flat index), safe to damage."""
    return Path(shutil.copytree(datastore.path, tmp_path / "ds"))


# ---- corpora -------------------------------------------------------------------------
BAD_CORPORA = {
    "empty": ("corpus.txt", b"", "corpus file is empty"),
    "whitespace": ("corpus.txt", b"  \n\t\n", "corpus file is empty"),
    "binary": ("corpus.txt", b"PK\x03\x04\x00\x00" + bytes(range(256)), "looks binary"),
    "latin-1": ("corpus.txt", "Caf\u00e9 na\u00efve r\u00e9sum\u00e9\n".encode("latin-1"), "not valid UTF-8"),
    "missing": ("corpus.txt", None, "corpus file not found"),
    "directory": ("corpus.txt", "dir", "is a directory"),
    "jsonl-invalid-line": ("docs.jsonl", b'{"text": "fine"}\n{"text": oops\n', ":2: invalid JSON"),
    "jsonl-no-text": ("docs.jsonl", b'{"title": "t", "body": "b"}\n', "string field 'text'"),
    "jsonl-all-empty": ("docs.jsonl", b'{"text": "  "}\n\n', "no non-empty 'text'"),
}


def make_bad_corpus(tmp_path: Path, case: str) -> tuple[Path, str]:
    name, content, message = BAD_CORPORA[case]
    path = tmp_path / "bad" / name
    path.parent.mkdir()
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    return path, message


@pytest.mark.parametrize("case", list(BAD_CORPORA))
def test_build_refuses_a_bad_corpus_and_writes_nothing(case, llama_dir, corpus, tmp_path, capsys):
    bad, message = make_bad_corpus(tmp_path, case)
    out = tmp_path / "out"
    err = fails(capsys, ["build", corpus, bad, "-o", out, *model_args(llama_dir), *WINDOWS])
    assert message in err and str(bad) in err
    assert not out.exists() and not out.with_name("out.partial").exists()


@pytest.mark.parametrize("case", ["empty", "binary", "latin-1", "missing", "directory"])
def test_build_over_a_datastore_with_a_bad_corpus_keeps_the_old_one(case, ds_copy, llama_dir, tmp_path, capsys):
    bad, message = make_bad_corpus(tmp_path, case)
    before = snapshot(ds_copy)
    err = fails(capsys, ["build", bad, "-o", ds_copy, "--overwrite", *model_args(llama_dir), *WINDOWS])
    assert message in err
    assert snapshot(ds_copy) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "ds"]  # no .partial, no .old
    assert Datastore(ds_copy).count == len(np.load(ds_copy / "vals.npy"))


@pytest.mark.parametrize("case", ["empty", "binary", "latin-1", "missing", "jsonl-invalid-line"])
def test_eval_refuses_a_bad_text(case, ds_copy, llama_dir, tmp_path, capsys):
    bad, message = make_bad_corpus(tmp_path, case)
    err = fails(capsys, ["eval", bad, "-d", ds_copy, *model_args(llama_dir), *WINDOWS])
    assert message in err and str(bad) in err
    err = fails(capsys, ["eval", bad, *model_args(llama_dir), *WINDOWS])  # base LM only
    assert message in err


def test_build_refuses_to_replace_a_datastore_without_overwrite(ds_copy, corpus, llama_dir, capsys):
    before = snapshot(ds_copy)
    err = fails(capsys, ["build", corpus, "-o", ds_copy, *model_args(llama_dir), *WINDOWS])
    assert "already exists" in err and "--overwrite" in err and str(ds_copy) in err
    assert snapshot(ds_copy) == before


# ---- missing files -------------------------------------------------------------------
def test_missing_datastore(corpus, llama_dir, tmp_path, capsys):
    nowhere = tmp_path / "nowhere"
    for argv in (["info", nowhere], ["index", nowhere],
                 *([cmd, corpus, "-d", nowhere, "-o", tmp_path / "out", *model_args(llama_dir)]
                   for cmd in ("eval", "tune", "explain")),
                 ["generate", "The", "-d", nowhere, *model_args(llama_dir)]):
        err = fails(capsys, argv)
        assert "datastore not found" in err and str(nowhere) in err
    (tmp_path / "empty").mkdir()
    err = fails(capsys, ["info", tmp_path / "empty"])
    assert "not a datastore (no meta.json)" in err and str(tmp_path / "empty") in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


@pytest.mark.parametrize("name", DATA_FILES)
def test_missing_datastore_file(name, ds_copy, corpus, llama_dir, capsys):
    (ds_copy / name).unlink()
    with pytest.raises(KnnlmError, match=f"missing: .*{name}"):
        Datastore(ds_copy)
    for argv in (["info", ds_copy], ["eval", corpus, "-d", ds_copy, *model_args(llama_dir), *WINDOWS]):
        err = fails(capsys, argv)
        assert "datastore file missing" in err and name in err


def test_missing_model(corpus, tmp_path, capsys):
    nowhere = tmp_path / "no" / "such-model"
    for argv in (["build", corpus, "-o", tmp_path / "out"], ["eval", corpus]):
        err = fails(capsys, argv + ["--model", nowhere, "--device", "cpu"])
        assert "cannot load model" in err and str(nowhere) in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


# ---- a datastore from another model, tokenizer or key point --------------------------
@pytest.fixture(scope="module")
def llama_other_weights(tmp_path_factory):
    """The tiny llama's architecture and tokenizer, other random weights."""
    return make_model_dir("llama", tmp_path_factory.mktemp("models") / "llama-seed1", seed=1)


@pytest.fixture(scope="module")
def llama_other_tokenizer(llama_dir, tmp_path_factory):
    """The tiny llama's weights with a tokenizer that has one more special token."""
    from transformers import AutoTokenizer

    out = Path(shutil.copytree(llama_dir, tmp_path_factory.mktemp("models") / "llama-tok"))
    tok = AutoTokenizer.from_pretrained(out)
    tok.add_special_tokens({"additional_special_tokens": ["<|sep|>"]})
    tok.save_pretrained(out)
    return out


@pytest.mark.parametrize("other, message", [
    ("gpt2", "whose weights differ"),
    ("llama_other_weights", "whose weights differ"),
    ("llama_other_tokenizer", "was built with the tokenizer of"),
])
def test_datastore_from_another_model_or_tokenizer(other, message, request, model_dirs, llama_dir, ds_copy,
                                                   corpus, tmp_path, capsys):
    other_dir = model_dirs[other] if other in model_dirs else request.getfixturevalue(other)
    before = snapshot(ds_copy)
    result = tmp_path / "result.json"
    for cmd in ("eval", "tune", "explain"):
        err = fails(capsys, [cmd, corpus, "-d", ds_copy, "-o", result, *model_args(other_dir), *WINDOWS])
        assert message in err
        assert str(llama_dir) in err and str(other_dir) in err  # names both models
    assert snapshot(ds_copy) == before and not result.exists()


def test_datastore_from_another_key_point(lm, datastore):
    with pytest.raises(KnnlmError, match="key point 'ffn_input', not 'final'"):
        datastore.check_compatible(lm.identity("final"))
    datastore.check_compatible(lm.identity("ffn_input"))  # its own is fine


# ---- corrupted datastores ------------------------------------------------------------
def _truncate(name, size=None):
    def f(p):
        data = (p / name).read_bytes()
        (p / name).write_bytes(data[: len(data) // 2 if size is None else size])
    return f


def _garble_header(name):
    def f(p):
        data = bytearray((p / name).read_bytes())
        data[:16] = b"garbage-garbage!"
        (p / name).write_bytes(bytes(data))
    return f


def _resave(name, change):
    def f(p):
        np.save(p / name, change(np.load(p / name)))
    return f


def _write(name, content: bytes):
    def f(p):
        (p / name).write_bytes(content)
    return f


def _edit_meta(change):
    def f(p):
        meta = json.loads((p / "meta.json").read_text())
        change(meta)
        (p / "meta.json").write_text(json.dumps(meta))
    return f


CORRUPTIONS = {
    "keys-truncated": (_truncate("keys.npy"), "keys.npy .* truncated or corrupted"),
    "keys-empty": (_truncate("keys.npy", 0), "keys.npy .* truncated or corrupted"),
    "keys-header-garbled": (_garble_header("keys.npy"), "keys.npy .* truncated or corrupted"),
    "keys-fewer-rows": (_resave("keys.npy", lambda a: a[:-1]), r"keys.npy .* has shape \(\d+, 32\).*meta.json says"),
    "keys-float32": (_resave("keys.npy", lambda a: a.astype(np.float32)), "keys.npy .* float32.*float16"),
    "vals-truncated": (_truncate("vals.npy"), "vals.npy .* truncated or corrupted"),
    "tokens-truncated": (_truncate("tokens.npy", 40), "tokens.npy .* truncated or corrupted"),
    "docs-not-npy": (_write("docs.npy", b"not a numpy file at all\n"), "docs.npy .* truncated or corrupted"),
    "docs-jsonl-garbled": (_write("docs.jsonl", b'{"source": "corpus.txt", "li'), "docs.jsonl .* corrupted"),
    "docs-jsonl-short": (_write("docs.jsonl", b""), "docs.jsonl and docs.npy disagree"),
    "meta-garbled": (_write("meta.json", b'{"format_version": 1, "count": '), "corrupted meta.json"),
    "meta-empty": (_write("meta.json", b""), "corrupted meta.json"),
    "meta-binary": (_write("meta.json", b"\xff\xfe\x00\x01\x02"), "corrupted meta.json"),
    "meta-not-an-object": (_write("meta.json", b"[1, 2, 3]"), "corrupted meta.json"),
    "meta-version": (_edit_meta(lambda m: m.update(format_version=99)), "datastore format 99 is not supported"),
    "meta-no-version": (_edit_meta(lambda m: m.pop("format_version")), "corrupted meta.json .*format_version"),
    "meta-count-larger": (_edit_meta(lambda m: m.update(count=m["count"] + 1)), "keys.npy .* has shape"),
    "meta-count-text": (_edit_meta(lambda m: m.update(count="many")), "corrupted meta.json"),
    "meta-no-count": (_edit_meta(lambda m: m.pop("count")), "corrupted meta.json .*count"),
    "meta-no-identity": (_edit_meta(lambda m: m.pop("identity")), "corrupted meta.json .*identity"),
    "meta-no-id": (_edit_meta(lambda m: m.pop("id")), "corrupted meta.json .*: no id"),
    "meta-no-fingerprint": (_edit_meta(lambda m: m["identity"].pop("tokenizer_fingerprint")),
                            "corrupted meta.json .*identity.tokenizer_fingerprint"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupted_datastore(case, ds_copy, corpus, llama_dir, tmp_path, capsys):
    corrupt, pattern = CORRUPTIONS[case]
    corrupt(ds_copy)
    before = snapshot(ds_copy)
    with pytest.raises(KnnlmError, match=pattern):
        Datastore(ds_copy)
    for argv in (["info", ds_copy], ["index", ds_copy, "--overwrite"],
                 ["eval", corpus, "-d", ds_copy, "-o", tmp_path / "r.json", *model_args(llama_dir), *WINDOWS],
                 ["tune", corpus, "-d", ds_copy, "-o", tmp_path / "t.json", *model_args(llama_dir), *WINDOWS]):
        err = fails(capsys, argv)
        assert str(ds_copy) in err
        assert re.search(pattern, err), err
    assert snapshot(ds_copy) == before  # nothing "repaired" or half-rewritten
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "t.json").exists()


def test_flipped_bytes_are_caught_by_verify(ds_copy, capsys):
    keys = ds_copy / "keys.npy"
    data = bytearray(keys.read_bytes())
    data[-7] ^= 0x40  # same size, valid header: only the checksum can tell
    keys.write_bytes(bytes(data))
    succeeds(capsys, ["info", ds_copy])
    err = fails(capsys, ["info", ds_copy, "--verify"])
    assert "keys.npy" in err and "does not match its checksum" in err


# ---- indexes -------------------------------------------------------------------------
@pytest.fixture
def other_ds(lm, jsonl_corpus, tmp_path) -> Path:
    """Another datastore (other corpus, other size) with the same model, and its own Flat index."""
    out = build_datastore(lm, [jsonl_corpus], tmp_path / "other", window=32, stride=16, batch_tokens=128,
                          progress=False)[0]
    build_index(Datastore(out), "Flat", progress=False)
    return out


def test_index_of_another_datastore_via_the_command(ds_copy, other_ds, corpus, llama_dir, capsys):
    shutil.rmtree(other_ds / "indexes")
    shutil.copytree(ds_copy / "indexes", other_ds / "indexes")  # same model, same name, another datastore
    before = snapshot(other_ds)
    for cmd in ("eval", "tune"):
        err = fails(capsys, [cmd, corpus, "-d", other_ds, "-o", other_ds.parent / "r.json", *model_args(llama_dir),
                             *WINDOWS])
        assert "was built for datastore" in err and Datastore(ds_copy).id in err and str(other_ds) in err
        assert "--overwrite" in err  # says how to fix it
    assert snapshot(other_ds) == before
    succeeds(capsys, ["index", other_ds, "--type", "Flat", "--overwrite"])  # the fix it names works
    succeeds(capsys, ["eval", corpus, "-d", other_ds, *model_args(llama_dir), *WINDOWS, "-k", "4"])


def test_index_of_another_size_with_the_right_id(ds_copy, other_ds, corpus, llama_dir, capsys):
    shutil.copy(other_ds / "indexes" / "flat" / "index.faiss", ds_copy / "indexes" / "flat" / "index.faiss")
    err = fails(capsys, ["eval", corpus, "-d", ds_copy, *model_args(llama_dir), *WINDOWS])
    assert f"holds {Datastore(other_ds).count} keys, the datastore {Datastore(ds_copy).count}" in err


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "index.json").write_text("{not json"), "corrupted index.json"),
    (lambda d: (d / "index.json").write_text("[1, 2]"), "corrupted index.json"),
    (lambda d: (d / "index.faiss").write_bytes((d / "index.faiss").read_bytes()[:100]), "cannot read"),
    (lambda d: (d / "index.faiss").unlink(), "cannot read"),
    (lambda d: shutil.rmtree(d), "has no index; build one with `knnlm index`"),
], ids=["index-json-garbled", "index-json-not-an-object", "index-faiss-truncated", "index-faiss-missing",
        "no-index"])
def test_broken_or_missing_index(damage, message, ds_copy, corpus, llama_dir, capsys):
    damage(ds_copy / "indexes" / "flat")
    err = fails(capsys, ["eval", corpus, "-d", ds_copy, *model_args(llama_dir), *WINDOWS])
    assert message in err


def test_unknown_index_name_and_bad_factory(ds_copy, corpus, llama_dir, capsys):
    err = fails(capsys, ["eval", corpus, "-d", ds_copy, "--index", "ivf", *model_args(llama_dir), *WINDOWS])
    assert "no index 'ivf'" in err and "have: flat" in err
    before = snapshot(ds_copy)
    err = fails(capsys, ["index", ds_copy, "--type", "NoSuchIndex12"])
    assert "invalid FAISS factory string 'NoSuchIndex12'" in err
    err = fails(capsys, ["index", ds_copy, "--type", "IVF4096,Flat"])  # more lists than keys
    assert "cannot train IVF4096,Flat" in err
    err = fails(capsys, ["index", ds_copy, "--type", "Flat"])
    assert "already exists" in err and "--overwrite" in err
    assert snapshot(ds_copy) == before  # no half-written index directory


# ---- settings ------------------------------------------------------------------------
SETTINGS = [
    (["-k", "100000"], r"k=100000 is larger than the datastore \(\d+ entries\)"),
    (["-k", "0"], "k must be >= 1, got 0"),
    (["--lambda", "-0.1"], r"lambda must be in \[0, 1\], got -0.1"),
    (["--lambda", "1.5"], r"lambda must be in \[0, 1\], got 1.5"),
    (["--lambda", "nan"], r"lambda must be in \[0, 1\], got nan"),
    (["--temperature", "0"], "temperature must be > 0, got 0.0"),
    (["--temperature", "-1"], "temperature must be > 0, got -1.0"),
    (["--temperature", "nan"], "temperature must be > 0, got nan"),
    (["--window", "1024"], "window 1024 is longer than the model's 256 positions"),
    (["--stride", "64"], "1 <= stride <= window"),
]


@pytest.mark.parametrize("args, pattern", SETTINGS, ids=[" ".join(a) for a, _ in SETTINGS])
def test_eval_refuses_bad_settings(args, pattern, ds_copy, corpus, llama_dir, tmp_path, capsys):
    result = tmp_path / "result.json"
    result.write_text('{"kept": true}\n')  # an earlier result is not clobbered by a failed run
    err = fails(capsys, ["eval", corpus, "-d", ds_copy, "-o", result, *model_args(llama_dir), *WINDOWS, *args])
    assert re.search(pattern, err), err
    assert result.read_text() == '{"kept": true}\n'


@pytest.mark.parametrize("args, pattern", [
    (["--cache-lambda", "1.5"], r"cache lambda must be in \[0, 1\], got 1.5"),
    (["--cache-lambda", "-0.1"], r"cache lambda must be in \[0, 1\], got -0.1"),
    (["--cache-lambda", "0.1", "--cache-size", "0"], "cache size must be >= 1"),
    (["--cache-lambda", "0.1", "--cache-theta", "-1"], "cache theta must be >= 0"),
])
def test_eval_refuses_bad_cache_settings(args, pattern, corpus, llama_dir, capsys):
    err = fails(capsys, ["eval", corpus, *model_args(llama_dir), *WINDOWS, *args])
    assert re.search(pattern, err), err


@pytest.mark.parametrize("args, pattern", [
    (["--lambdas", "0.1,-0.1"], r"lambda must be in \[0, 1\], got -0.1"),
    (["--lambdas", "1.5"], r"lambda must be in \[0, 1\], got 1.5"),
    (["--temperatures", "1,0"], "temperature must be > 0, got 0.0"),
    (["--temperatures", "-1"], "temperature must be > 0, got -1.0"),
    (["--lambdas", "0.1,x"], "--lambdas.*'0.1,x'"),
    (["--ks", "4,two"], "--ks.*'4,two'"),
    (["-k", "100000"], r"k=100000 is larger than the datastore \(\d+ entries\)"),
    (["-k", "8", "--ks", "4,16"], "--ks goes up to 16 but only --k 8"),
    (["-k", "8", "--ks", "0,4"], "k must be >= 1, got 0"),
])
def test_tune_refuses_bad_settings(args, pattern, ds_copy, corpus, llama_dir, tmp_path, capsys):
    out = tmp_path / "tune.json"
    err = fails(capsys, ["tune", corpus, "-d", ds_copy, "-o", out, *model_args(llama_dir), *WINDOWS, *args])
    assert re.search(pattern, err), err
    assert not out.exists()


@pytest.mark.parametrize("args, pattern", [
    (["--lambda", "1.5"], r"lambda must be in \[0, 1\], got 1.5"),
    (["--lambda", "-0.1"], r"lambda must be in \[0, 1\], got -0.1"),
    (["--temperature", "0"], "temperature must be > 0, got 0.0"),
    (["-k", "100000"], r"k=100000 is larger than (the )?datastore ('\S+' )?\(\d+ entries\)"),
])
def test_explain_and_generate_refuse_bad_settings(args, pattern, ds_copy, corpus, llama_dir, tmp_path, capsys):
    out = tmp_path / "explain.md"
    err = fails(capsys, ["explain", corpus, "-d", ds_copy, "-o", out, *model_args(llama_dir), *WINDOWS, "-k", "4",
                         *args])
    assert re.search(pattern, err), err
    assert not out.exists() and not out.with_suffix(".json").exists()
    err = fails(capsys, ["generate", "The quick", "-d", ds_copy, *model_args(llama_dir), "--max-new-tokens", "2",
                         "-k", "4", *args])
    assert re.search(pattern, err), err


@pytest.mark.parametrize("args, pattern", [
    (["--max-batch", "0"], "--max-batch must be >= 1, got 0"),
    (["--max-queue", "-1"], "--max-queue must be >= 1, got -1"),
    (["--max-tokens", "0"], "--max-tokens must be >= 1, got 0"),
    (["--port", "70000"], "--port must be in 1..65535, got 70000"),
    (["--default-datastore", "law"], "--default-datastore 'law' is not one of the --datastore names"),
])
def test_serve_refuses_bad_options_before_listening(args, pattern, ds_copy, llama_dir, monkeypatch, capsys):
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("the server started"))
    err = fails(capsys, ["serve", "--datastore", f"wiki={ds_copy}", *model_args(llama_dir), *args])
    assert re.search(re.escape(pattern), err), err


# ---- interrupted builds --------------------------------------------------------------
def interrupt_at(monkeypatch, where: str, batch: int, exc=KeyboardInterrupt) -> None:
    """Make the next build die while on `batch` (0-based):
    `forward`: before the batch's forward pass (batches 0..batch-1 are on disk);
    `progress`: after its keys are in keys.npy but before progress.json records it."""
    if where == "forward":
        original = knnlm.core.batching.Plan.batch_input
        calls = []

        def batch_input(self, b, *a, **kw):
            calls.append(b)
            if len(calls) == batch + 1:
                raise exc()
            return original(self, b, *a, **kw)

        monkeypatch.setattr(knnlm.core.batching.Plan, "batch_input", batch_input)
    else:
        original = knnlm.core.datastore.write_json_atomic

        def write(path, obj):
            if path.name == "progress.json" and obj["batches_done"] == batch + 1:
                raise exc()
            return original(path, obj)

        monkeypatch.setattr(knnlm.core.datastore, "write_json_atomic", write)


def count_forward_batches(monkeypatch) -> list[int]:
    original = knnlm.core.batching.Plan.batch_input
    calls: list[int] = []

    def batch_input(self, b, *a, **kw):
        calls.append(b)
        return original(self, b, *a, **kw)

    monkeypatch.setattr(knnlm.core.batching.Plan, "batch_input", batch_input)
    return calls


@pytest.mark.parametrize("where", ["forward", "progress"])
def test_interrupted_build_resumes_to_the_same_datastore(where, corpus, llama_dir, tmp_path, capsys, monkeypatch):
    argv = [corpus, *model_args(llama_dir), *WINDOWS, "--index", "Flat", "--no-tune"]  # count the build's batches
    succeeds(capsys, ["build", "-o", tmp_path / "ref", *argv])

    out, partial = tmp_path / "ds", tmp_path / "ds.partial"
    with monkeypatch.context() as m:
        interrupt_at(m, where, batch=3)
        err = fails(capsys, ["build", "-o", out, *argv])
    assert "interrupted" in err and str(partial) in err and "resume" in err
    assert not out.exists()  # nothing published
    assert json.loads((partial / "progress.json").read_text())["batches_done"] == 3
    assert not (partial / "meta.json").exists()
    for cmd in (["info", out], ["eval", corpus, "-d", out, *model_args(llama_dir), *WINDOWS]):
        err = fails(capsys, cmd)  # a partial build is not a datastore, and the message says where it is
        assert str(out) in err and str(partial) in err

    with monkeypatch.context() as m:
        calls = count_forward_batches(m)
        succeeds(capsys, ["build", "-o", out, *argv])
    assert calls == [3, 4, 5]  # resumed after the last recorded batch, not restarted
    assert_same_datastore(out, tmp_path / "ref")
    succeeds(capsys, ["eval", corpus, "-d", out, *model_args(llama_dir), *WINDOWS, "-k", "4"])


def test_interrupted_overwrite_keeps_the_old_datastore(ds_copy, jsonl_corpus, llama_dir, tmp_path, capsys,
                                                       monkeypatch):
    before, old_id = snapshot(ds_copy), Datastore(ds_copy).id
    argv = ["build", jsonl_corpus, "-o", ds_copy, "--overwrite", *model_args(llama_dir), *WINDOWS, "--index", "none"]
    with monkeypatch.context() as m:
        interrupt_at(m, "forward", batch=1)
        fails(capsys, argv)
    assert snapshot(ds_copy) == before and Datastore(ds_copy).id == old_id  # the old one, whole
    succeeds(capsys, argv)
    new = Datastore(ds_copy)
    assert new.id != old_id and new.meta["corpora"][0]["name"] == "docs.jsonl" and len(new.docs) == 8
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ds")) == ["ds"]  # no .partial, no .old


@pytest.mark.parametrize("change", ["stride", "corpus", "model", "progress-garbled", "partial-keys-deleted"])
def test_resume_with_other_input_restarts_cleanly(change, corpus, llama_dir, model_dirs, tmp_path, capsys,
                                                  monkeypatch):
    text = tmp_path / "corpus.txt"
    shutil.copy(corpus, text)
    out, partial = tmp_path / "ds", tmp_path / "ds.partial"
    argv = [text, *model_args(llama_dir), *WINDOWS, "--index", "none"]
    with monkeypatch.context() as m:
        interrupt_at(m, "progress", batch=2)
        fails(capsys, ["build", "-o", out, *argv])
    assert (partial / "progress.json").exists()
    if change == "stride":
        argv = [a if a != "16" else "8" for a in argv]
    elif change == "corpus":
        text.write_text(TEXT + " A brand new sentence at the end.", encoding="utf-8")
    elif change == "model":
        argv = [a if a != str(llama_dir) else str(model_dirs["gpt2"]) for a in argv]
    elif change == "progress-garbled":
        (partial / "progress.json").write_text('{"signature": {"batch')
    else:
        (partial / "keys.npy").unlink()

    with monkeypatch.context() as m:
        calls = count_forward_batches(m)
        succeeds(capsys, ["build", "-o", out, *argv])
    assert calls[0] == 0 and calls == sorted(set(calls))  # started over, each batch once
    succeeds(capsys, ["build", "-o", tmp_path / "ref", *argv])  # uninterrupted, the new input
    assert_same_datastore(out, tmp_path / "ref")


@pytest.mark.parametrize("exc, caught", [(KeyboardInterrupt, KnnlmError), (RuntimeError, RuntimeError)])
def test_library_build_interrupted_with_several_key_points(exc, caught, lm, corpus, tmp_path):
    """One pass writing two datastores: a crash (Ctrl-C or any error) publishes neither,
    and the same call resumes to what an uninterrupted build writes."""
    kw = dict(window=32, stride=16, batch_tokens=128, key_points=["ffn_input", "final"], progress=False)
    refs = build_datastore(lm, [corpus], tmp_path / "ref", **kw)

    def crash(bi):
        if bi == 2:
            raise exc()

    out = tmp_path / "ds"
    with pytest.raises(caught):
        build_datastore(lm, [corpus], out, on_batch=crash, **kw)
    assert not out.exists() and not (tmp_path / "ds-final").exists()
    assert (tmp_path / "ds.partial").exists() and (tmp_path / "ds-final.partial").exists()
    done = []
    outs = build_datastore(lm, [corpus], out, on_batch=done.append, **kw)
    assert done == list(range(3, BATCHES))
    for o, r in zip(outs, refs):
        assert_same_datastore(o, r)
    assert Datastore(outs[1]).key_point == "final"
