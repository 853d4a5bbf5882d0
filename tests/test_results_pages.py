"""The results pages and docs record paths as placeholders (benchmarks/common.py), never as
they were on the machine that ran a benchmark."""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import PLACEHOLDERS, command_line, placeholders  # noqa: E402

MACHINE = re.compile(r"(?<![\w.])/(?:work|tmp)/")
def test_machine_paths_become_placeholders():
    text = ("flock /tmp/knnlm-cpu.lock /work/main/.venv/bin/python benchmarks/x.py --cache /work/cache/wikitext2 "
            "--work /tmp/run1 --out /work/ooc12 --data /work/shared/data --t /work/wt-api/benchmarks/cache/t "
            "and `/work/cache`; .venv/bin/python stays")
    assert placeholders(text) == (
        "python benchmarks/x.py --cache CACHE/wikitext2 --work WORK/run1 --out WORK/ooc12 --data ../shared/data "
        "--t benchmarks/cache/t and `CACHE`; .venv/bin/python stays")
    assert "CACHE" in PLACEHOLDERS and "WORK" in PLACEHOLDERS
    assert command_line(ROOT / "benchmarks" / "bench_scale.py", argv=["--cache", "/work/cache/wikitext2", "a b"]) == (
        "python benchmarks/bench_scale.py --cache CACHE/wikitext2 'a b'")
    named = command_line("bench_cache.py", {"DATASTORE": "/data/ds", "TEXT": "/tmp/t.txt"},
                         argv=["--datastore", "/data/ds/", "--test-text", "/tmp/t.txt", "--out", "/tmp/o"])
    assert named == "python benchmarks/bench_cache.py --datastore DATASTORE/ --test-text TEXT --out WORK/o"


def test_pages_hold_no_machine_paths():
    pages = [p for folder in ("docs", "benchmarks/results") for p in (ROOT / folder).rglob("*")
             if p.suffix in (".md", ".json")] + [ROOT / "README.md", ROOT / "benchmarks" / "README.md"]
    found = {}
    for p in pages:
        name = p.relative_to(ROOT).as_posix()
        lines = [n for n, line in enumerate(p.read_text("utf-8").splitlines(), 1) if MACHINE.search(line)]
        if lines:
            found[name] = lines[:5]
    assert not found, f"machine paths (write them with benchmarks/common.py's placeholders): {found}"
