import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import ARCHS, TEXT, make_model_dir  # noqa: E402

DEVICE = os.environ.get("KNNLM_TEST_DEVICE", "cpu")  # `cuda` runs the pipeline tests on a GPU


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch, request):
    """Keep tests out of the user's cache, except the real-model test which reuses it."""
    if "real_model" not in request.keywords:  # see tests/test_real_model.py
        monkeypatch.setenv("KNNLM_HOME", str(tmp_path_factory.getbasetemp() / "knnlm-home"))


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {arch: make_model_dir(arch, root / arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def llama_dir(model_dirs):
    return model_dirs["llama"]


@pytest.fixture(scope="session")
def lm(llama_dir):
    from knnlm.core.model import LM

    return LM.load(str(llama_dir), dtype="float32", device=DEVICE)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    p.write_text(TEXT, encoding="utf-8")
    return p


@pytest.fixture(scope="session")
def jsonl_corpus(tmp_path_factory) -> Path:
    import json

    p = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    docs = [s.strip() + "." for s in TEXT.split(".") if s.strip()][:8]
    p.write_text("".join(json.dumps({"title": f"doc{i}", "text": d}) + "\n" for i, d in enumerate(docs)))
    return p


@pytest.fixture(scope="session")
def datastore(lm, corpus, tmp_path_factory):
    """A datastore over `corpus` with the tiny llama, small windows, and a Flat index."""
    from knnlm.core.datastore import Datastore, build_datastore
    from knnlm.core.index import build_index

    out = tmp_path_factory.mktemp("ds") / "ds"
    build_datastore(lm, [corpus], out, window=32, stride=16, batch_tokens=128, progress=False)
    ds = Datastore(out)
    build_index(ds, "Flat", progress=False)
    return ds
