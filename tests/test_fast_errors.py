"""Bad input is refused before the model loads, in exactly one `error:` line, and no
third-party loader chatter reaches the terminal.

Each case runs the `knnlm` command in-process with `LM.load` and FAISS made to fail: a
check that waited for the model (or the index file) would end in that failure instead of
the expected line.  stderr must be exactly `error: <message>\n`, nothing before it.
"""

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import knnlm
import knnlm.core.index
from knnlm.cli.main import main, quiet_libraries
from knnlm.core.datastore import Datastore, build_datastore
from knnlm.core.model import LM

WINDOWS = ["--window", "32", "--stride", "16", "--batch-tokens", "128"]


@pytest.fixture
def ds_copy(datastore, tmp_path) -> Path:
    return Path(shutil.copytree(datastore.path, tmp_path / "ds"))


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model or reading a FAISS index fails the test."""
    def refuse(*a, **kw):
        raise AssertionError("the model was loaded before the input was checked")

    def no_faiss():
        raise AssertionError("faiss was needed before the input was checked")

    monkeypatch.setattr(LM, "load", refuse)
    monkeypatch.setattr(knnlm.core.index, "_faiss", no_faiss)


def cases(corpus: Path, ds: Path, tmp: Path, llama_dir: Path, count: int) -> dict[str, tuple[list, str]]:
    model = ["--model", str(llama_dir), "--device", "cpu"]
    missing, nowhere = tmp / "missing.txt", tmp / "nowhere"
    return {
        "eval-missing-text": (["eval", missing, "-d", ds, *model], f"corpus file not found: {missing}"),
        "eval-missing-text-no-datastore": (["eval", missing, *model], f"corpus file not found: {missing}"),
        "eval-missing-datastore": (["eval", corpus, "-d", nowhere, *model], f"datastore not found: {nowhere}"),
        "eval-k-0": (["eval", corpus, "-d", ds, "-k", "0", *model], "k must be >= 1, got 0"),
        "eval-k-too-large": (["eval", corpus, "-d", ds, "-k", "100000", *model],
                             f"k=100000 is larger than the datastore ({count} entries)"),
        "eval-lambda": (["eval", corpus, "-d", ds, "--lambda", "1.5", *model], "lambda must be in [0, 1], got 1.5"),
        "eval-temperature": (["eval", corpus, "-d", ds, "--temperature", "0", *model],
                             "temperature must be > 0, got 0.0"),
        "eval-nprobe": (["eval", corpus, "-d", ds, "--nprobe", "0", *model], "--nprobe must be >= 1, got 0"),
        "eval-index-name": (["eval", corpus, "-d", ds, "--index", "ivf", *model],
                            f"no index 'ivf' in {ds} (have: flat)"),
        "eval-stride": (["eval", corpus, "--window", "32", "--stride", "64", *model],
                        "need window >= 2 and 1 <= stride <= window, got window=32 stride=64"),
        "eval-cache-lambda": (["eval", corpus, "--cache-lambda", "2", *model], "cache lambda must be in [0, 1], got 2.0"),
        "eval-output-is-a-directory": (["eval", corpus, "-o", tmp, *model],
                                       f"output is a directory, expected a file name: {tmp}"),
        "tune-no-datastore": (["tune", corpus, *model], "`knnlm tune` needs a datastore: -d DIR (from `knnlm build`)"),
        "tune-missing-text": (["tune", missing, "-d", ds, *model], f"corpus file not found: {missing}"),
        "tune-k-too-large": (["tune", corpus, "-d", ds, "-k", "100000", *model],
                             f"k=100000 is larger than the datastore ({count} entries)"),
        "explain-top": (["explain", corpus, "-d", ds, "--top", "0", *model],
                        "need --top >= 1 and --neighbors >= 0, got 0 and 5"),
        "explain-missing-datastore": (["explain", corpus, "-d", nowhere, *model], f"datastore not found: {nowhere}"),
        "generate-missing-datastore": (["generate", "The", "-d", nowhere, *model], f"datastore not found: {nowhere}"),
        "generate-top-p": (["generate", "The", "-d", ds, "-k", "4", "--top-p", "2", *model],
                           "top_p must be in (0, 1], got 2.0"),
        "generate-index-name": (["generate", "The", "-d", ds, "-k", "4", "--index", "ivf", *model],
                                f"no index 'ivf' in {ds} (have: flat)"),
        "serve-missing-datastore": (["serve", "--datastore", f"wiki={nowhere}", *model],
                                    f"datastore not found: {nowhere}"),
        "serve-lambda": (["serve", "--datastore", f"wiki={ds}", "--lambda", "2", *model],
                         "lambda must be in [0, 1], got 2.0"),
        "eval-missing-memory": (["eval", corpus, "--memory", nowhere, *model], f"memory decoder not found: {nowhere}"),
        "generate-missing-memory": (["generate", "The", "--memory", nowhere, *model],
                                    f"memory decoder not found: {nowhere}"),
        "serve-missing-memory": (["serve", "--datastore", f"wiki={ds}", "--memory", f"m={nowhere}", *model],
                                 f"memory decoder not found: {nowhere}"),
        "build-missing-corpus": (["build", missing, "-o", tmp / "out", *model], f"corpus file not found: {missing}"),
        "build-existing-output": (["build", corpus, "-o", ds, *model],
                                  f"{ds} already exists (use --overwrite to replace it)"),
        "build-stride": (["build", corpus, "-o", tmp / "out", "--stride", "0", *model],
                         "need window >= 2 and 1 <= stride <= window, got window=1024 stride=0"),
    }


CASES = list(cases(Path("c"), Path("d"), Path("t"), Path("m"), 0))


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_error_line_before_the_model_loads(case, no_model, corpus, ds_copy, llama_dir, tmp_path,
                                                            capsys):
    argv, message = cases(corpus, ds_copy, tmp_path, llama_dir, Datastore(ds_copy).count)[case]
    code = main([*map(str, argv)])  # not -q: an INFO line before the error would show
    out, err = capsys.readouterr()
    assert (code, err, out) == (1, f"error: {message}\n", "")


def test_an_index_of_another_datastore_is_refused_before_the_model_loads(no_model, ds_copy, jsonl_corpus, lm,
                                                                         corpus, tmp_path, capsys):
    other = build_datastore(lm, [jsonl_corpus], tmp_path / "other", window=32, stride=16, batch_tokens=128,
                            progress=False)[0]
    shutil.copytree(ds_copy / "indexes", other / "indexes")  # the index of ds_copy, in another datastore
    code = main(["eval", str(corpus), "-d", str(other), *WINDOWS])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and err.startswith(f"error: index {other / 'indexes' / 'flat'} was "
                                                                 f"built for datastore {Datastore(ds_copy).id}")


def test_the_device_index_needs_no_index_files(no_model, corpus, ds_copy, capsys):
    with pytest.raises(AssertionError, match="the model was loaded"):  # checks passed: on to the model
        main(["eval", str(corpus), "-d", str(ds_copy), "--index", "torch", *WINDOWS])


def test_loader_chatter_is_off_and_our_messages_on():
    quiet_libraries(quiet=False)
    assert not logging.getLogger("faiss.loader").isEnabledFor(logging.INFO)  # "Loading faiss with AVX512 ..."
    assert logging.getLogger("knnlm.core.datastore").isEnabledFor(logging.INFO)
    quiet_libraries(quiet=True)
    assert not logging.getLogger("knnlm.cli").isEnabledFor(logging.INFO)
    assert logging.getLogger("knnlm.cli").isEnabledFor(logging.WARNING)


def run_cli(*argv) -> subprocess.CompletedProcess:
    """`python -m knnlm ARGV` in a fresh process, with this test run's knnlm."""
    env = {**os.environ, "PYTHONPATH": str(Path(knnlm.__file__).parents[1])}
    return subprocess.run([sys.executable, "-m", "knnlm", *map(str, argv)], capture_output=True, text=True, env=env)


def test_the_command_prints_only_its_error_line(tmp_path):
    done = run_cli("eval", tmp_path / "missing.txt", "-d", tmp_path / "ds")
    assert (done.returncode, done.stderr, done.stdout) == (1, f"error: corpus file not found: "
                                                              f"{tmp_path / 'missing.txt'}\n", "")


def test_faiss_says_nothing_when_it_loads(ds_copy):
    done = run_cli("index", ds_copy, "--type", "Flat", "--name", "again")  # imports faiss; not -q
    assert done.returncode == 0, done.stderr
    assert "faiss" not in done.stderr.lower() and "avx" not in done.stderr.lower(), done.stderr
    assert done.stdout.startswith(f"index {ds_copy / 'indexes' / 'again'}: Flat")


def test_the_parser_imports_no_heavy_library():
    """`knnlm COMMAND` refuses bad input in a fraction of a second: building the parser (and
    the checks) imports neither torch, transformers, faiss nor FastAPI."""
    code = ("import sys; from knnlm.cli.main import build_parser; import knnlm.cli.checks; build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers', 'faiss', 'fastapi') if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": str(Path(knnlm.__file__).parents[1])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert (done.returncode, done.stdout) == (0, "[]\n"), done.stderr
