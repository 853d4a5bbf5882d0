"""The package's front door (re-exported as `knnlm.load`, `knnlm.load_lm`, `knnlm.build`):
the few calls a user needs, each composing the modules below it the way the CLI does."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from knnlm.run.options import WindowSettings


def load_lm(model: str | None = None, dtype: str = "float32", device: str = "cpu"):
    """A causal LM from the Hub or a local path (default: smollm2-135m), as `knnlm.LM`."""
    from knnlm.core.model import DEFAULT_MODEL, LM

    return LM.load(model or DEFAULT_MODEL, dtype=dtype, device=device)


def load(datastores: str | Path | Mapping[str, str | Path] | None = None, model: str | None = None,
         dtype: str | None = None, device: str = "cpu", **options):
    """A `knnlm.KNNLM` for generation and scoring: the model (default: the first datastore's)
    with its datastores (a path, or names -> paths; a single path is named "default").
    `options` are KNNLM's (default datastore, memories, λ, k, ...)."""
    from knnlm.run.generate import KNNLM

    if isinstance(datastores, (str, Path)):
        datastores = {"default": datastores}
    return KNNLM.load(model, datastores, dtype=dtype, device=device, **options)


def build(lm, corpora: Sequence[str | Path], out: str | Path, windows: WindowSettings | None = None,
          index: str = "auto", tune: bool = True, overwrite: bool = False, progress: bool = True):
    """What `knnlm build` does: a datastore of `corpora` at `out` (keys of `lm`, an LM or a
    model name), its `index` made during the forward pass ("auto", "Flat", a FAISS factory
    string; "none": no index, nor tuning) and, with `tune`, its settings
    tuned on its own corpus (knnlm.run.selftune).  Returns the opened `knnlm.Datastore`."""
    from knnlm.core.datastore import BuildSettings, Datastore, build_datastore
    from knnlm.core.index_fill import IndexSettings

    if isinstance(lm, str):
        lm = load_lm(lm)
    settings = BuildSettings(windows=windows or WindowSettings(),
                             index=IndexSettings(index) if index != "none" else None)  # made during the pass
    path = build_datastore(lm, corpora, out, settings, overwrite=overwrite, progress=progress)[0]
    ds = Datastore(path)
    if index != "none":
        if tune:
            from knnlm.run.selftune import self_tune

            self_tune(lm, ds, batch_tokens=settings.windows.batch_tokens, progress=progress)
            ds = Datastore(path)
    return ds
