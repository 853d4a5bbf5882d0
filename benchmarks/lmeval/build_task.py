"""Build the `wikitext_cloze` lm-evaluation-harness task's data: last-word multiple choice
from WikiText-2's test articles (wiki.test.raw, disjoint from the wiki.valid.raw datastore).

Each example is a passage of an article (up to --context-chars characters before a
sentence, then that sentence without its last word) and four choices for the last word:
the true one and three distractors, words that end other sentences of the test set with
the same capitalisation and a similar frequency (so the rarer true words do not stand
out).  Text stays in WikiText's raw form (" @-@ ", spaces before punctuation), as the
datastore was built from it.

    python benchmarks/lmeval/build_task.py                      # -> benchmarks/cache/lmeval/wikitext_cloze.jsonl
    python benchmarks/lmeval/build_task.py --examples 100 --data ../shared/data

Writes the JSONL and a manifest (source file, sha256, settings, counts) beside it;
benchmarks/lmeval/wikitext_cloze.yaml reads the JSONL (run lm_eval from the repo root).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DATA = REPO.parent / "shared" / "data"
SOURCE = "wikitext-2-raw/wiki.test.raw"
SHA256 = "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"  # see the data folder's SOURCE.md
WORD = re.compile(r"^[A-Za-z]{4,}$")


def articles(text: str) -> list[tuple[str, list[str]]]:
    """(title, paragraphs) of each article; a top-level heading ` = Title = ` starts one."""
    out: list[tuple[str, list[str]]] = []
    for line in text.split("\n"):
        m = re.match(r"^ = ([^=].*) = $", line)
        if m:
            out.append((m.group(1), []))
        elif out and line.strip() and not line.startswith(" = "):
            out[-1][1].append(line.strip())
    return out


def sentences(paragraph: str) -> list[str]:
    """WikiText sentences end in ' .' followed by a space (its tokens are space-separated)."""
    parts = re.split(r"(?<= \.) ", paragraph)
    return [p for p in parts if p.endswith(" .")]


def candidates(arts: list[tuple[str, list[str]]], min_context: int, context_chars: int) -> list[dict]:
    """Every sentence whose last word is alphabetic (4+ letters), with the article's text before it."""
    out = []
    for title, paras in arts:
        before = ""
        for para in paras:
            for sent in sentences(para):
                words = sent[:-2].split(" ")
                last = words[-1]
                if WORD.match(last) and len(words) >= 6 and len(before) >= min_context:
                    ctx = before[-context_chars:]
                    if len(before) > context_chars:  # start at a sentence (else a word) boundary
                        cut = ctx.find(" . ")
                        ctx = ctx[cut + 3 :] if 0 <= cut < len(ctx) // 2 else ctx[ctx.index(" ") + 1 :]
                    out.append({"title": title, "context": ctx + " ".join(words[:-1]), "word": last})
                before += sent + " "
            before = before[:-1] + "\n "
    return out


def build(text: str, n: int, seed: int, context_chars: int, min_context: int, per_article: int) -> list[dict]:
    arts = articles(text)
    cands = candidates(arts, min_context, context_chars)
    freq = collections.Counter(w for w in re.findall(r"[A-Za-z]+", text))
    pool = sorted({c["word"] for c in cands}, key=lambda w: (freq[w], w))  # ends of sentences, by frequency
    rank = {w: i for i, w in enumerate(pool)}
    rng = random.Random(seed)
    rng.shuffle(cands)
    taken: collections.Counter = collections.Counter()
    out = []
    for c in cands:
        if len(out) == n:
            break
        if taken[c["title"]] >= per_article:
            continue
        word, upper = c["word"], c["word"][0].isupper()
        near = [w for w in pool[max(0, rank[word] - 60) : rank[word] + 60]
                if w != word and w[0].isupper() == upper and w.lower() != word.lower()]
        if len(near) < 3:
            continue
        choices = [word] + rng.sample(near, 3)
        rng.shuffle(choices)
        taken[c["title"]] += 1
        out.append({"id": len(out), "title": c["title"], "context": c["context"],
                    "choices": [" " + w for w in choices], "answer": choices.index(word)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DATA), help="folder holding wikitext-2-raw/wiki.test.raw")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "cache" / "lmeval" / "wikitext_cloze.jsonl"))
    ap.add_argument("--examples", type=int, default=300)
    ap.add_argument("--context-chars", type=int, default=600, help="article text before the sentence, at most")
    ap.add_argument("--min-context", type=int, default=200, help="skip sentences with less text before them")
    ap.add_argument("--per-article", type=int, default=12, help="examples from one article, at most")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    src = Path(args.data) / SOURCE
    raw = src.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != SHA256:
        raise SystemExit(f"error: {src} has sha256 {digest}, expected {SHA256}")
    docs = build(raw.decode("utf-8"), args.examples, args.seed, args.context_chars, args.min_context,
                 args.per_article)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    manifest = {"source": SOURCE, "sha256": digest, "examples": len(docs),
                "articles": len({d["title"] for d in docs}), "jsonl_sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
                "settings": {k: v for k, v in vars(args).items() if k not in ("data", "out")}}
    out.with_suffix(".manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    print(json.dumps(manifest))


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common.py
    from common import run_main  # a failure ends in one `error:` line

    run_main(main)
