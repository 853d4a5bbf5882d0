"""What is derived from a datastore records the datastore version it came from (indexes,
tuned settings, Memory Decoder targets and decoders), and using it after documents were
removed says so: targets computed before the removal are refused (a decoder would learn the
removed documents from them), a decoder trained on them warns in one line."""

import json
import logging
import shutil

import pytest
from test_bad_input import fails, model_args, snapshot, succeeds
from test_memory_cli import TRAIN
from tiny import TEXT

from knnlm import RetrievalSettings
from knnlm.core.datastore import Datastore, build_datastore
from knnlm.core.edit import compact, remove_documents
from knnlm.core.index import build_index


@pytest.fixture(scope="module")
def made(lm, llama_dir, tmp_path_factory) -> dict:
    """A datastore of 8 documents (Flat index), its targets and a 1-layer decoder, made at version 0."""
    from knnlm.cli.main import main

    root = tmp_path_factory.mktemp("versions")
    sents = [s.strip() + "." for s in TEXT.split(".") if s.strip()]
    p = root / "docs.jsonl"
    p.write_text("".join(json.dumps({"title": f"d{i}", "text": s}) + "\n" for i, s in enumerate(sents[:8])))
    build_datastore(lm, [p], root / "ds", window=32, stride=16, batch_tokens=128, progress=False)
    build_index(Datastore(root / "ds"), "Flat", progress=False)
    assert main(["-q", "memory", "targets", str(root / "ds"), "-o", str(root / "t"), "-k", "8", "--keep", "8"]) == 0
    assert main(["-q", "memory", "train", str(root / "ds"), "--targets", str(root / "t"), "-o", str(root / "mem"),
                 "--layers", "1", *TRAIN, *model_args(llama_dir)]) == 0
    return {"ds": root / "ds", "targets": root / "t", "mem": root / "mem"}


@pytest.fixture
def edited(made, tmp_path):
    """A copy of the datastore with document 3 removed (version 1)."""
    ds = shutil.copytree(made["ds"], tmp_path / "ds")
    remove_documents(ds, [3])
    return ds


def test_indexes_settings_targets_and_decoders_record_the_version(made, edited):
    from knnlm.memory.targets import TargetSettings, build_targets

    assert json.loads((made["targets"] / "meta.json").read_text())["datastore_version"] == 0
    assert json.loads((made["mem"] / "memory.json").read_text())["datastore_version"] == 0
    assert json.loads((made["ds"] / "indexes" / "flat" / "index.json").read_text())["datastore_version"] == 0
    ds = Datastore(edited)
    ds.record_settings({"k": 8, "lambda": 0.25, "temperature": 1.0})
    assert Datastore(edited).settings["datastore_version"] == 1
    build_index(Datastore(edited), "Flat", name="again", progress=False)
    assert json.loads((edited / "indexes" / "again" / "index.json").read_text())["datastore_version"] == 1
    t = build_targets(edited, edited.parent / "t", TargetSettings(keep=8), retrieval=RetrievalSettings(k=8, index="flat"),
                      progress=False)
    meta = json.loads((t / "meta.json").read_text())
    assert meta["datastore_version"] == 1 and meta["datastore_removed"] == [3]


def test_targets_from_before_a_removal_are_refused(made, edited, capsys, llama_dir, tmp_path):
    from knnlm.memory.targets import Targets, TargetSettings, build_targets

    before = snapshot(tmp_path)
    err = fails(capsys, ["memory", "train", edited, "--targets", made["targets"], "-o", tmp_path / "mem",
                         "--layers", "1", *TRAIN, *model_args(llama_dir)])
    assert "before 1 of its documents were removed" in err and "compute the targets again" in err
    assert snapshot(tmp_path) == before
    t = build_targets(edited, tmp_path / "t", TargetSettings(keep=8), retrieval=RetrievalSettings(k=8), progress=False)
    Targets(t).check_for(Datastore(edited))


def test_a_decoder_trained_on_removed_documents_says_so_in_one_line(made, edited, caplog):
    from knnlm.memory.decoder import MemoryDecoder, removed_since

    meta = json.loads((made["mem"] / "memory.json").read_text())
    with caplog.at_level(logging.WARNING, logger="knnlm"):
        MemoryDecoder.load(made["mem"])  # its datastore: nothing removed
    assert not caplog.records and removed_since(meta) == 0
    meta["datastore"] = str(edited)  # the decoder as if trained on the edited copy before the removal
    (made["mem"] / "memory.json").write_text(json.dumps(meta))
    try:
        for edit in ("remove", "compact"):  # after the compaction too (a new datastore id, its log names the old)
            if edit == "compact":
                compact(edited)
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="knnlm"):
                MemoryDecoder.load(made["mem"])
            warned = [r.getMessage() for r in caplog.records]
            assert len(warned) == 1 and "trained on 1 document(s) since removed" in warned[0]
            assert "\n" not in warned[0] and removed_since(meta) == 1
    finally:
        meta["datastore"] = str(made["ds"])
        (made["mem"] / "memory.json").write_text(json.dumps(meta))


def test_info_says_which_version_settings_were_tuned_on(made, edited, capsys):
    assert "tuned on version" not in succeeds(capsys, ["info", made["ds"]])
    shutil.rmtree(edited)
    shutil.copytree(made["ds"], edited)
    Datastore(edited).record_settings({"k": 8, "lambda": 0.25, "temperature": 1.0})
    assert "tuned on version" not in succeeds(capsys, ["info", edited])
    remove_documents(edited, [1])
    assert "tuned on version 0" in succeeds(capsys, ["info", edited])
