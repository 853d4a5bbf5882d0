"""Kill -9 during the writing commands (tests/kill.py; the full campaign, Ray commands
included, is benchmarks/bench_kill.py): a point in the middle and one near the end of each
command's run, then the state left behind and the rerun are checked."""

import shutil

import pytest
from kill import COMMANDS, Workspace
from test_bad_input import model_args

from knnlm.cli.main import main
from knnlm.core.datastore import Datastore
from knnlm.core.index import list_indexes
from knnlm.retrieval.reduce import reduce_datastore
from knnlm.scale import open_datastore
from knnlm.scale.split import split_datastore

FAST = ["index", "shard", "reduce", "memory targets", "remove", "compact"]


@pytest.fixture(scope="module")
def workspace(llama_dir, tmp_path_factory):
    return Workspace.create(tmp_path_factory.mktemp("kill"), llama_dir)


@pytest.mark.parametrize("name", FAST + ["build", "memory train"])
def test_killed_then_rerun(workspace, name):
    cmd = COMMANDS[name]
    seconds, reference = workspace.reference(cmd)
    fractions = (0.6, 0.95) if name in FAST else (0.8,)  # the slow ones: one point, near their end
    for i, f in enumerate(fractions):
        o = workspace.kill_point(cmd, reference, f * seconds, tag=f"{name.replace(' ', '_')}-{i}")
        assert not o.problems, o.problems


# ---- what a kill just after publishing left: the output without its index ------------
def _published_then_killed(out):
    (out.parent / (out.name + ".unfinished")).touch()  # as the command leaves it from its start


def test_shard_finishes_an_output_published_before_a_kill(datastore, tmp_path, capsys):
    out = tmp_path / "sharded"
    split_datastore(datastore.path, out, 1)
    _published_then_killed(out)
    assert main(["-q", "shard", str(datastore.path), "-o", str(out), "--shards", "1", "--index", "Flat"]) == 0
    assert list_indexes(open_datastore(out)) == ["flat"] and not (tmp_path / "sharded.unfinished").exists()
    assert main(["-q", "shard", str(datastore.path), "-o", str(out), "--shards", "1"]) == 1  # finished: exists
    assert "already exists" in capsys.readouterr().err


def test_reduce_finishes_an_output_published_before_a_kill(datastore, tmp_path):
    src = shutil.copytree(datastore.path, tmp_path / "src")
    out = tmp_path / "small"
    reduce_datastore(Datastore(src), out, 8)
    _published_then_killed(out)
    assert main(["-q", "reduce", str(src), "-o", str(out), "--pca", "8", "--index", "Flat"]) == 0
    assert list_indexes(Datastore(out)) == ["flat"]


def test_build_finishes_an_output_published_before_a_kill(corpus, llama_dir, tmp_path):
    out = tmp_path / "ds"
    args = ["-q", "build", str(corpus), "-o", str(out), "--index", "Flat", "--no-tune", "--window", "32",
            "--stride", "16", *model_args(llama_dir)]
    assert main([*args, "--index", "none"]) == 0  # the datastore, published; then "killed"
    _published_then_killed(out)
    assert main(args) == 0
    assert list_indexes(Datastore(out)) == ["flat"]


def test_an_index_being_written_is_no_index(datastore, tmp_path, capsys):
    """A kill while an index was written left indexes/NAME.partial/ with a half-written
    index.json: it was listed as an index, and `info --verify` failed on it."""
    ds = shutil.copytree(datastore.path, tmp_path / "ds")
    (ds / "indexes" / "ivf.partial").mkdir()
    (ds / "indexes" / "ivf.partial" / "index.json").write_text("")
    assert list_indexes(Datastore(ds)) == ["flat"]
    assert main(["info", str(ds), "--verify"]) == 0


def test_add_run_again_after_its_commit_adds_nothing(datastore, jsonl_corpus, llama_dir, tmp_path, capsys):
    """`knnlm add` killed after its commit, run again: it added the same documents twice."""
    ds = shutil.copytree(datastore.path, tmp_path / "ds")
    args = ["-q", "add", str(ds), str(jsonl_corpus), *model_args(llama_dir), "--batch-tokens", "64"]
    assert main(args) == 0
    after = Datastore(ds).count
    assert main(args) == 1
    assert "already added" in capsys.readouterr().err
    assert Datastore(ds).count == after
    (ds / "other.jsonl").write_text(jsonl_corpus.read_text().replace("fox", "cat"))
    assert main([*args[:3], str(ds / "other.jsonl"), *args[4:]]) == 0  # other documents: added
    assert main(args) == 0  # not the last edit: added again, as asked
