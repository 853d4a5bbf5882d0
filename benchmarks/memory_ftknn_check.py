"""Check behind docs/memory.md's fine-tuned + kNN row (bench_memory.py ftquality tuned λ = 0): is
the fine-tuned LM's kNN really of no use on held-out text?  Base LM + base datastore vs
fine-tuned LM + its datastore on the first 20k characters of valid_heldout.txt, k = 1024:
how often the target is among the neighbours' values, and the mixture at a few λ and T.

    head -c 20000 /work/cache/wikitext2/valid_heldout.txt > /tmp/wt9a/held20k.txt
    PYTHONPATH=src python benchmarks/memory_ftknn_check.py    # under the CPU lock (~30 s)
"""
import numpy as np

from knnlm.core.batching import plan_files
from knnlm.core.index import Searcher
from knnlm.core.model import LM
from knnlm.core.scoring import interpolate, knn_target_logprobs, perplexity
from knnlm.run.evaluate import open_for_model, score_plan

for name, model, ds in (("base", "smollm2-135m", "/work/cache/wikitext2/ds-bfloat16"),
                        ("finetuned", "/work/cache/mem9a/finetuned", "/work/cache/mem9a/ds-finetuned")):
    lm = LM.load(model, dtype="bfloat16", device="cpu")
    d = open_for_model(lm, ds)
    s = Searcher(d, "ivf2048-pq64")
    plan = plan_files(lm, ["/tmp/wt9a/held20k.txt"], 1024, 512, 4096)
    sc = score_plan(lm, plan, s, k=1024, keep_neighbors=True, progress=False)
    hit = (sc.vals == sc.targets[:, None]).any(1).mean()
    hit16 = (sc.vals[:, :16] == sc.targets[:, None]).any(1).mean()
    out = [f"{name}: n={plan.count} LM ppl {perplexity(sc.lm):.3f} target in 1024 nbrs {hit:.3f} in 16 {hit16:.3f} "
           f"median d1 {np.median(sc.dists[:, 0]):.1f} d1024 {np.median(sc.dists[:, -1]):.1f}"]
    for T in (1, 4, 16):
        knn = knn_target_logprobs(sc.dists, sc.vals, sc.targets, T)
        out.append(f"  T={T}: kNN alone {perplexity(knn):.1f}; " + ", ".join(
            f"λ={lam}: {perplexity(interpolate(sc.lm, knn, lam)):.3f}" for lam in (0.05, 0.1, 0.25)))
    print("\n".join(out), flush=True)
