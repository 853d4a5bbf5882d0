"""`knnlm memory targets|train` and the memory decoder's bad input: one `error:` line
each, nothing half-written."""

import json
import shutil
from pathlib import Path

import pytest
from test_bad_input import fails, model_args, snapshot, succeeds
from tiny import TEXT

from knnlm.core.datastore import Datastore, build_datastore
from knnlm.core.index import build_index

TRAIN = ["--batch-size", "4", "--seq-len", "16", "--heldout", "0.2", "--epochs", "1"]


@pytest.fixture(scope="module")
def docs_ds(lm, tmp_path_factory) -> Path:
    sents = [s.strip() + "." for s in TEXT.split(".") if s.strip()]
    p = tmp_path_factory.mktemp("memcli") / "docs.jsonl"
    p.write_text("".join(json.dumps({"title": f"d{i}", "text": s}) + "\n" for i, s in enumerate(sents[:8])))
    out = tmp_path_factory.mktemp("memcli") / "ds"
    build_datastore(lm, [p], out, window=32, stride=16, batch_tokens=128, progress=False)
    build_index(Datastore(out), "Flat", progress=False)
    return out


@pytest.fixture(scope="module")
def trained(docs_ds, llama_dir, tmp_path_factory) -> dict:
    """targets and a 1-layer decoder made through the command line."""
    from knnlm.cli.main import main

    root = tmp_path_factory.mktemp("memcli")
    assert main(["-q", "memory", "targets", str(docs_ds), "-o", str(root / "t"), "-k", "8", "--keep", "8"]) == 0
    assert main(["-q", "memory", "train", str(docs_ds), "--targets", str(root / "t"), "-o", str(root / "mem"),
                 "--layers", "1", *TRAIN, *model_args(llama_dir)]) == 0
    return {"targets": root / "t", "mem": root / "mem"}


def test_commands_make_targets_and_a_decoder(trained):
    meta = json.loads((trained["mem"] / "memory.json").read_text())
    assert meta["layers"] == 1 and meta["k"] == 8 and meta["steps"] >= 1
    assert (trained["mem"] / "config.json").exists() and (trained["mem"] / "tokenizer.json").exists()


def test_targets_refuse_a_datastore_without_its_corpus_tokens(docs_ds, tmp_path, capsys):
    ds = Path(shutil.copytree(docs_ds, tmp_path / "ds"))
    (ds / "tokens.npy").unlink()
    err = fails(capsys, ["memory", "targets", ds, "-o", tmp_path / "t"])
    assert "has no corpus tokens (tokens.npy)" in err and str(ds) in err
    assert not (tmp_path / "t").exists() and not (tmp_path / "t.partial").exists()


def test_targets_refuse_a_corpus_that_does_not_match_the_entries(docs_ds, tmp_path, capsys):
    import numpy as np

    ds = Path(shutil.copytree(docs_ds, tmp_path / "ds"))
    tokens = np.load(ds / "tokens.npy")
    tokens[5] += 1
    np.save(ds / "tokens.npy", tokens)
    err = fails(capsys, ["memory", "targets", ds, "-o", tmp_path / "t"])
    assert "do not match its values" in err
    assert not (tmp_path / "t").exists() and not (tmp_path / "t.partial").exists()


@pytest.mark.parametrize("args, message", [
    (["--exclude", "nobody"], "exclude must be 'document', 'self' or 'radius:N'"),
    (["--exclude", "radius:0"], "exclude must be"),
    (["-k", "0"], "k must be >= 1"),
    (["-k", "100000"], "k=100000 is more than the"),
    (["--temperature", "0"], "temperature must be > 0"),
    (["--keep", "0"], "keep must be >= 1"),
])
def test_targets_refuse_bad_settings(args, message, docs_ds, tmp_path, capsys):
    before = snapshot(docs_ds)
    assert message in fails(capsys, ["memory", "targets", docs_ds, "-o", tmp_path / "t", *args])
    assert not (tmp_path / "t").exists() and not (tmp_path / "t.partial").exists()
    assert snapshot(docs_ds) == before


@pytest.mark.parametrize("args, message", [
    (["--alpha", "1.5"], r"alpha must be in [0, 1], got 1.5"),
    (["--alpha", "-0.1"], r"alpha must be in [0, 1], got -0.1"),
    (["--layers", "3"], "L=3 layers cannot be cut from"),
    (["--layers", "0"], "--layers must be >= 1"),
    (["--heldout", "1"], "heldout must be in [0, 1)"),
    (["--epochs", "0"], "epochs must be >= 1"),
])
def test_train_refuses_bad_settings(args, message, trained, docs_ds, llama_dir, tmp_path, capsys):
    err = fails(capsys, ["memory", "train", docs_ds, "--targets", trained["targets"], "-o", tmp_path / "mem",
                         *TRAIN, *model_args(llama_dir), *args])
    assert message in err
    assert not (tmp_path / "mem").exists() and not (tmp_path / "mem.partial").exists()


def test_train_refuses_targets_of_another_datastore(trained, datastore, llama_dir, tmp_path, capsys):
    err = fails(capsys, ["memory", "train", datastore.path, "--targets", trained["targets"], "-o", tmp_path / "m",
                         *TRAIN, *model_args(llama_dir)])
    assert "were computed from datastore" in err and str(datastore.path) in err
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.partial").exists()


def test_train_refuses_missing_targets(docs_ds, llama_dir, tmp_path, capsys):
    err = fails(capsys, ["memory", "train", docs_ds, "--targets", tmp_path / "nowhere", "-o", tmp_path / "m",
                         *TRAIN, *model_args(llama_dir)])
    assert "not a memory-targets directory" in err
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.partial").exists()


def test_train_without_targets_is_ce_only(docs_ds, llama_dir, tmp_path, capsys):
    out = succeeds(capsys, ["memory", "train", docs_ds, "-o", tmp_path / "m", "--alpha", "0", "--keep-weights", "last",
                            "--until-train-loss", "1e9", "--layers", "1", *TRAIN, "--epochs", "3",
                            *model_args(llama_dir)])
    meta = json.loads((tmp_path / "m" / "memory.json").read_text())
    assert meta["targets"] is None and meta["kept"] == "last" and meta["stopped"] == "train_loss"
    assert "kept: last, stopped: train_loss" in out
    err = fails(capsys, ["memory", "train", docs_ds, "-o", tmp_path / "n", *TRAIN, *model_args(llama_dir)])
    assert "alpha = 0.5 needs p_kNN targets" in err
    assert not (tmp_path / "n").exists() and not (tmp_path / "n.partial").exists()
    assert "until_train_loss must be > 0" in fails(capsys, ["memory", "train", docs_ds, "-o", tmp_path / "n",
                                                            "--alpha", "0", "--until-train-loss", "0",
                                                            *TRAIN, *model_args(llama_dir)])


def test_help_has_examples(capsys):
    for cmd in (["memory", "targets"], ["memory", "train"]):
        with pytest.raises(SystemExit):
            succeeds(capsys, [*cmd, "--help"])
        out = capsys.readouterr().out
        assert "examples:" in out and "knnlm memory" in out
