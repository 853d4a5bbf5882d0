"""Ray, imported lazily: start a local Ray (stopped at the end) or join a cluster."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Iterator

from knnlm.errors import KnnlmError

LOG = logging.getLogger(__name__)


def ray_module():
    try:
        import ray
    except ImportError:
        raise KnnlmError("Ray is not installed: pip install 'knnlm[ray]'") from None
    return ray


def runtime_env() -> dict:
    """Local workers import this very knnlm (its source directory first on PYTHONPATH)."""
    src = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)
    return {"env_vars": {"PYTHONPATH": path}}


def connect(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Use the running Ray of this process, or join `address`, or start a local one.
    Returns whether this call started or joined it (then the caller shuts it down)."""
    ray = ray_module()
    if ray.is_initialized():
        return False
    try:
        if address:
            LOG.info("joining the Ray cluster at %s", address)
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        else:
            ray.init(num_cpus=num_cpus, runtime_env=runtime_env(), logging_level=logging.WARNING,
                     log_to_driver=False, include_dashboard=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise KnnlmError(f"cannot start or reach {where}: {str(e).strip().splitlines()[-1]}") from None
    return True


@contextlib.contextmanager
def session(address: str | None = None, num_cpus: int | None = None) -> Iterator[object]:
    """Ray for the duration of a block: stopped at the end if this block started it."""
    ray = ray_module()
    started = connect(address, num_cpus)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()
