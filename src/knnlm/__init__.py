"""knnlm: nearest-neighbour language models for any pretrained causal LM.

    import knnlm

    lm = knnlm.load_lm("smollm2-135m")                    # any HF causal LM
    knnlm.build(lm, ["corpus.txt"], "ds")                 # datastore + index + self-tuned settings
    knnlm.evaluate(lm, ["test.txt"], "ds")                # {'ppl_lm': ..., 'ppl_knnlm': ...}
    knn = knnlm.load(datastores={"wiki": "ds"})           # generation and scoring: a KNNLM
    knn.generate("The history of", max_new_tokens=16).text

Names are imported on first use: `import knnlm` stays cheap (no torch).
"""

from __future__ import annotations

import importlib

from knnlm.errors import KnnlmError

__version__ = "0.1.0"

_LAZY = {  # public name -> module that defines it
    "KNNLM": "knnlm.run.generate",
    "LM": "knnlm.core.model",
    "Datastore": "knnlm.core.datastore",
    "evaluate": "knnlm.run.evaluate",
    "build": "knnlm.run.api",
    "load": "knnlm.run.api",
    "load_lm": "knnlm.run.api",
    "RetrievalSettings": "knnlm.run.options",
    "MixSettings": "knnlm.run.options",
    "WindowSettings": "knnlm.run.options",
    "CacheSettings": "knnlm.run.options",
    "Sampling": "knnlm.run.options",
    "Pointers": "knnlm.retrieval.pointers",
    "Adaptive": "knnlm.retrieval.adaptive",
}

__all__ = ["KnnlmError", "__version__", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'knnlm' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
