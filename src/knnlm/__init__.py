"""knnlm: nearest-neighbour language models for any pretrained causal LM."""

__version__ = "0.1.0"

from knnlm.errors import KnnlmError  # noqa: E402,F401
