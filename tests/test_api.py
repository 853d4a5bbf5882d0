"""The package's top level: cheap to import, a few names that do what the CLI does, and the
settings groups (knnlm.run.options) that replace long keyword lists."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import knnlm
from knnlm import CacheSettings, KnnlmError, MixSettings, RetrievalSettings, WindowSettings
from knnlm.core.datastore import BuildSettings, build_datastore
from knnlm.memory.targets import TargetSettings
from knnlm.run.explain import ExplainSettings

SRC = Path(__file__).resolve().parents[1] / "src"


def test_import_is_cheap():
    """`import knnlm` (and its settings types) loads neither torch nor transformers."""
    code = ("import sys, knnlm; knnlm.MixSettings; "
            "print(sorted(m for m in ('torch', 'transformers', 'faiss') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_top_level_names():
    from knnlm.run.evaluate import evaluate
    from knnlm.run.generate import KNNLM

    assert knnlm.evaluate is evaluate and knnlm.KNNLM is KNNLM
    assert set(dir(knnlm)) >= {"load", "load_lm", "build", "evaluate", "KNNLM", "MixSettings"}
    with pytest.raises(AttributeError):
        knnlm.no_such_name


@pytest.mark.parametrize("make, message", [
    (lambda: RetrievalSettings(k=0), "k must be >= 1"),
    (lambda: RetrievalSettings(temperature=0.0), "temperature must be > 0"),
    (lambda: RetrievalSettings(nprobe=0), "nprobe must be >= 1"),
    (lambda: RetrievalSettings(pointers=64), "pointers must be"),
    (lambda: MixSettings(lam=1.5), "lambda must be in [0, 1]"),
    (lambda: MixSettings(mode="sometimes"), "lambda mode must be one of adaptive, fixed"),
    (lambda: MixSettings(memory_lambda=-0.1), "memory lambda must be in [0, 1]"),
    (lambda: WindowSettings(window=8, stride=16), "1 <= stride <= window"),
    (lambda: CacheSettings(size=0), "cache size must be >= 1"),
    (lambda: TargetSettings(keep=0), "keep must be >= 1"),
    (lambda: TargetSettings(chunk=0), "chunk must be >= 1"),
    (lambda: TargetSettings(exclude="radius:0"), "exclude must be 'document', 'self' or 'radius:N'"),
    (lambda: TargetSettings(exclude_documents=[3, -1]), "exclude_documents must be document numbers (>= 0)"),
    (lambda: TargetSettings(exclude_documents=[0.5]), "exclude_documents must be document numbers"),
    (lambda: ExplainSettings(top=0), "need top >= 1 and neighbors >= 0"),
    (lambda: ExplainSettings(context=0), "need context >= 1 and min_context >= 0"),
    (lambda: ExplainSettings(by="gain"), "by must be 'log' or 'prob'"),
])
def test_settings_are_checked(make, message):
    with pytest.raises(KnnlmError, match=re.escape(message)):
        make()


def test_settings_are_frozen():
    with pytest.raises(AttributeError):
        MixSettings().lam = 0.5


def test_grouped_settings_equal_the_flat_keywords(lm, datastore, corpus):
    """evaluate with the settings groups gives what the command line's names give."""
    flat = knnlm.evaluate(lm, [corpus], datastore.path, index="flat", k=4, lam=0.3, temperature=2.0,
                          lambda_mode="fixed", window=32, stride=16, batch_tokens=128, cache_lambda=0.2,
                          cache_theta=0.5, progress=False)
    grouped = knnlm.evaluate(lm, [corpus], datastore.path,
                             retrieval=RetrievalSettings(k=4, temperature=2.0, index="flat"),
                             mixing=MixSettings(lam=0.3, mode="fixed", cache_lambda=0.2),
                             windows=WindowSettings(32, 16, 128), cache=CacheSettings(theta=0.5), progress=False)
    drop = ("seconds", "tokens_per_second", "seconds_lm", "seconds_knn")
    assert {k: v for k, v in grouped.items() if k not in drop} == {k: v for k, v in flat.items() if k not in drop}
    assert grouped["ppl_knnlm"] != grouped["ppl_lm"] and grouped["cache_theta"] == 0.5
    with pytest.raises(TypeError, match="unexpected keyword argument 'lamda'"):
        knnlm.evaluate(lm, [corpus], datastore.path, lamda=0.3)


def test_build_then_evaluate_from_the_top_level(lm, corpus, tmp_path):
    ds = knnlm.build(lm, [corpus], tmp_path / "ds", windows=WindowSettings(32, 16, 128), index="Flat",
                     progress=False)
    assert ds.meta["settings"]["how"].startswith("leave-own-document-out")
    res = knnlm.evaluate(lm, [corpus], ds.path, windows=WindowSettings(32, 16, 128), progress=False)
    assert res["settings_source"] == "datastore" and res["lambda"] == ds.meta["settings"]["lambda"]
    assert res["ppl_knnlm"] <= res["ppl_lm"] * 1.0001  # tuned, adaptive: never much worse than the LM


def test_knnlm_takes_the_settings_groups(lm, datastore):
    """KNNLM and its calls take the settings groups (and a Sampling); the flat names give the same."""
    from knnlm import KNNLM, Sampling

    grouped = KNNLM(lm, {"ds": datastore.path}, retrieval=RetrievalSettings(k=4, temperature=2.0, index="flat"),
                    mixing=MixSettings(lam=0.3, mode="fixed"))
    flat = KNNLM(lm, {"ds": datastore.path}, k=4, knn_temperature=2.0, index="flat", lam=0.3, lambda_mode="fixed")
    a, b = grouped.retrieval(), flat.retrieval()
    assert (a.k, a.lam, a.temperature, a.adapt) == (b.k, b.lam, b.temperature, b.adapt) == (4, 0.3, 2.0, False)
    g = grouped.generate("The quick", 6, Sampling(temperature=0.8, top_k=5, seed=1), retrieval=RetrievalSettings(k=2),
                         mixing=MixSettings(lam=0.5))
    f = flat.generate("The quick", 6, temperature=0.8, top_k=5, seed=1, k=2, lam=0.5)
    assert g.ids == f.ids and g.settings == f.settings and g.settings["k"] == 2
    s1 = grouped.score("The quick brown fox", retrieval=RetrievalSettings(k=2), mixing=MixSettings(lam=0.5))
    s2 = flat.score("The quick brown fox", k=2, lam=0.5)
    assert [t.logprob for t in s1.tokens] == [t.logprob for t in s2.tokens]
    with pytest.raises(KnnlmError, match="RetrievalSettings.index is set when the KNNLM is made"):
        grouped.generate("The quick", 2, retrieval=RetrievalSettings(index="flat"))
    with pytest.raises(KnnlmError, match="temperature must be >= 0"):
        Sampling(temperature=-1.0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'lamda'"):
        grouped.prepare("The quick", 2, lamda=0.3)
    with pytest.raises(TypeError, match="unexpected keyword argument 'temperature'"):
        KNNLM(lm, temperature=2.0)  # the kNN temperature is knn_temperature (temperature is sampling's)


MAX_PARAMETERS = 9


def test_no_public_call_takes_a_long_keyword_list():
    """The front door, KNNLM's calls, the memory targets and explain take settings objects,
    not long keyword lists."""
    import inspect

    from knnlm.memory.targets import build_targets
    from knnlm.run.explain import explain
    from knnlm.run.generate import KNNLM

    calls = [knnlm.load, knnlm.load_lm, knnlm.build, knnlm.evaluate, KNNLM.__init__, KNNLM.load, KNNLM.score,
             KNNLM.prepare, KNNLM.generate, KNNLM.stream, KNNLM.generate_many, KNNLM.next_token_distribution,
             build_datastore, build_targets, explain]
    for f in calls:
        params = [p for p in inspect.signature(f).parameters.values()
                  if p.name not in ("self", "cls") and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        assert len(params) <= MAX_PARAMETERS, (f.__qualname__, [p.name for p in params])


def test_build_settings_take_the_old_flat_keywords():
    """build_datastore's settings object, and its older flat keywords folded into it."""
    flat = dict(window=32, stride=16, batch_tokens=128, key_points=["final"], documents=[0, 3])
    assert BuildSettings.of(None, flat) == BuildSettings(WindowSettings(32, 16, 128), ("final",), (0, 3))
    base = BuildSettings(WindowSettings(64, 32, 256), key_points=("ffn_input",))
    assert BuildSettings.of(base, {"stride": 16}) == BuildSettings(WindowSettings(64, 16, 256), ("ffn_input",))
    assert BuildSettings.of(base, {}) is base
    with pytest.raises(TypeError, match="unexpected keyword argument 'windw'"):
        BuildSettings.of(None, {"windw": 32})
    with pytest.raises(KnnlmError, match="stride <= window"):
        BuildSettings.of(None, {"window": 32, "stride": 64})


# public functions of src/knnlm still over MAX_PARAMETERS, with their count when this list was
# made: none of them may grow, and no other public function may join them
STILL_LONG = {
    "knnlm.core.index.build_index": 11,
    "knnlm.memory.train.train_decoder": 10,
    "knnlm.retrieval.pointers.simulate": 12,
    "knnlm.run.evaluate.score_plan": 10,
    "knnlm.scale.build.build_sharded": 12,
    "knnlm.scale.index.build_sharded_index": 10,
}


def public_parameters(src: Path = SRC) -> dict[str, int]:
    """module.function (module.Class.method) -> its named parameters (self, cls, *args and
    **kwargs not counted), for every public function and method of the package (read from
    the source: nothing is imported)."""
    out = {}
    for path in sorted((src / "knnlm").rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        if any(p.startswith("_") and p != "__init__" for p in parts):
            continue
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        stack = [(node, module) for node in ast.parse(path.read_text("utf-8")).body]
        while stack:
            node, prefix = stack.pop()
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                stack += [(child, f"{prefix}.{node.name}") for child in node.body]
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (
                    not node.name.startswith("_") or node.name == "__init__"):
                a = node.args
                names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")]
                out[f"{prefix}.{node.name}"] = len(names)
    return out


def test_no_public_function_grows_a_long_keyword_list():
    counts = public_parameters()
    assert counts["knnlm.memory.targets.build_targets"] <= MAX_PARAMETERS  # the scan sees these
    assert counts["knnlm.run.generate.KNNLM.__init__"] <= MAX_PARAMETERS
    long = {name: n for name, n in counts.items() if n > MAX_PARAMETERS}
    new = {name: n for name, n in long.items() if name not in STILL_LONG}
    grown = {name: (STILL_LONG[name], n) for name, n in long.items() if name in STILL_LONG and n > STILL_LONG[name]}
    assert not new, f"public functions with more than {MAX_PARAMETERS} parameters (use a settings group): {new}"
    assert not grown, f"long parameter lists that grew (was, now): {grown}"


def test_the_parameter_scan_counts_what_a_signature_has(tmp_path):
    """The scanner itself: self and *args/**kwargs do not count, keyword-only ones do,
    private names and methods of private classes are skipped."""
    pkg = tmp_path / "knnlm"
    pkg.mkdir()
    (pkg / "a.py").write_text("def f(x, y=1, *args, z, **kw): pass\ndef _g(a, b, c): pass\n"
                              "class C:\n    def __init__(self, a): pass\n    def m(self, a, *, b): pass\n"
                              "class _D:\n    def m(self, a): pass\n")
    assert public_parameters(tmp_path) == {"knnlm.a.f": 3, "knnlm.a.C.__init__": 1, "knnlm.a.C.m": 2}
