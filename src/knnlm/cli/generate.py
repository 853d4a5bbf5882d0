"""`knnlm generate` and `knnlm serve`: thin edges over knnlm.run.generate and knnlm.serve.server."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

from knnlm.cli.checks import check_datastore, check_knn_args, check_memories
from knnlm.cli.common import add_cache_args, fewer_searches, load_lm
from knnlm.cli.memory import add_memory_args, memories
from knnlm.errors import KnnlmError

LOG = logging.getLogger("knnlm")


def _datastore_spec(spec: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {spec!r}")
    return name, path


def cmd_generate(args) -> None:
    check_knn_args(args)  # everything checkable before the model loads
    if args.neighbors < 0:
        raise KnnlmError(f"--neighbors must be >= 0, got {args.neighbors}")
    if args.datastore:
        check_datastore(args.datastore, args.index, args.k, name=Path(args.datastore).name)
    from knnlm.run.generate import KNNLM
    from knnlm.run.options import CacheSettings, MixSettings, RetrievalSettings, Sampling

    fewer = fewer_searches(args)
    sampling = Sampling(temperature=args.sampling_temperature, top_k=args.top_k, top_p=args.top_p, stop=args.stop,
                        seed=args.seed, neighbors=args.neighbors, ignore_eos=args.ignore_eos)
    if args.max_new_tokens < 1:
        raise KnnlmError(f"max_new_tokens must be >= 1, got {args.max_new_tokens}")
    check_memories(memories(args).values())
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if args.prompt is None and prompt.endswith("\n"):
        prompt = prompt[:-1]  # `echo text | knnlm generate`: the newline is echo's, not the prompt's
    lm = load_lm(args, args.datastore, memory=next(iter(memories(args).values()), None))
    datastores = {Path(args.datastore).name: args.datastore} if args.datastore else {}
    knn = KNNLM(lm, datastores, memories=memories(args), retrieval=RetrievalSettings(
                    index=args.index, nprobe=args.nprobe, rerank=False if args.no_rerank else None,
                    temperature=args.temperature, paper_defaults=args.paper_defaults, **fewer),
                mixing=MixSettings(lam=args.lam, mode=args.lambda_mode, memory_lambda=args.memory_lambda,
                                   by_distance=getattr(args, "lambda_by_distance", None),
                                   cache_lambda=args.cache_lambda),
                cache=CacheSettings(args.cache_theta, args.cache_size))
    options = dict(k=args.k)  # None: the datastore's tuned k; a -k above its size is an error
    t0 = time.perf_counter()
    if args.json:
        g = knn.generate(prompt, args.max_new_tokens, sampling, **options)
        print(json.dumps({"prompt": prompt, "text": g.text, "finish_reason": g.finish_reason, **g.settings,
                          "tokens": [asdict(t) for t in g.tokens]}, indent=2))
        n = len(g.tokens)
    else:
        n, tokens = 0, []
        for event in knn.stream(prompt, args.max_new_tokens, sampling, **options):
            sys.stdout.write(event.text)
            sys.stdout.flush()
            if event.token is not None:
                n += 1
                tokens.append(event.token)
        sys.stdout.write("\n")
        if args.neighbors:
            print(_render_neighbors(tokens))
    dt = time.perf_counter() - t0
    LOG.info("%d tokens in %.2f s (%.1f tokens/s)%s", n, dt, n / dt if dt > 0 else 0.0,
             "" if args.datastore else ", base LM (no datastore)")


def _render_neighbors(tokens) -> str:
    lines = []
    for i, t in enumerate(tokens):
        lines.append(f"[{i}] {t.text!r}  log p = {t.logprob:.3f} (LM {t.logprob_lm:.3f}, kNN {t.logprob_knn:.3f})")
        for n in t.neighbors:
            ctx = (n.context[-50:] + "[" + n.token + "]" + n.after).replace("\n", "\\n")
            lines.append(f"     {n.weight:.3f}  {n.title or n.source} @{n.offset}  …{ctx}")
    return "\n".join(lines)


def cmd_serve(args) -> None:
    from knnlm.core.scoring import check_settings
    from knnlm.serve.auth import api_keys, check_exposure

    for opt in ("max_queue", "max_batch", "max_tokens", "max_body_bytes", "max_prompt_chars"):  # before the model loads
        if getattr(args, opt) < 1:
            raise KnnlmError(f"--{opt.replace('_', '-')} must be >= 1, got {getattr(args, opt)}")
    fewer = fewer_searches(args)
    if not 0 < args.port < 65536:
        raise KnnlmError(f"--port must be in 1..65535, got {args.port}")
    keys = api_keys(args.api_key)
    warning = check_exposure(args.host, keys, args.insecure)
    datastores = dict(args.datastore or [])
    if len(datastores) != len(args.datastore or []):
        raise KnnlmError("each --datastore NAME must be different")
    if args.default_datastore and args.default_datastore != "none" and args.default_datastore not in datastores:
        raise KnnlmError(f"--default-datastore {args.default_datastore!r} is not one of the --datastore names "
                         f"({', '.join(datastores) or 'none'})")
    check_settings(lam=args.lam, temperature=args.knn_temperature, k=args.k)
    if args.nprobe is not None and args.nprobe < 1:
        raise KnnlmError(f"--nprobe must be >= 1, got {args.nprobe}")
    for name, path in datastores.items():
        check_datastore(path, args.index, k=None, name=name)
    mems = memories(args)
    if args.default_memory and args.default_memory != "none" and args.default_memory not in mems:
        raise KnnlmError(f"--default-memory {args.default_memory!r} is not one of the --memory names "
                         f"({', '.join(mems) or 'none'})")
    check_memories(mems.values())
    import uvicorn

    from knnlm.run.generate import KNNLM
    from knnlm.run.options import CacheSettings, MixSettings, RetrievalSettings
    from knnlm.serve.server import create_app

    lm = load_lm(args, next(iter(datastores.values()), None), memory=next(iter(mems.values()), None))
    knn = KNNLM(lm, datastores, None if args.default_datastore in (None, "none") else args.default_datastore,
                memories=mems, default_memory=None if args.default_memory in (None, "none") else args.default_memory,
                retrieval=RetrievalSettings(k=args.k, temperature=args.knn_temperature, index=args.index,
                                            nprobe=args.nprobe, rerank=False if args.no_rerank else None,
                                            paper_defaults=args.paper_defaults, **fewer),
                mixing=MixSettings(lam=args.lam, mode=args.lambda_mode, memory_lambda=args.memory_lambda,
                                   by_distance=getattr(args, "lambda_by_distance", None),
                                   cache_lambda=args.cache_lambda),
                cache=CacheSettings(args.cache_theta, args.cache_size))
    if args.default_datastore == "none":
        knn.default = None
    if args.default_memory == "none":
        knn.default_memory = None
    app = create_app(knn, max_queue=args.max_queue, max_tokens=args.max_tokens, model_name=args.served_model_name,
                     max_batch=args.max_batch, api_keys=keys, max_body_bytes=args.max_body_bytes,
                     max_prompt_chars=args.max_prompt_chars)
    if warning:
        LOG.warning(warning)
    if keys:
        LOG.info("%d API key(s): /v1/* requests need 'Authorization: Bearer KEY'", len(keys))
    LOG.info("http://%s:%d/docs for the API", args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning" if args.quiet else "info")


def register(add, add_model_args, add_knn_args, add_fewer_searches_args) -> None:
    """Add `generate` and `serve` to the knnlm parser (see knnlm.cli.build_parser)."""
    from knnlm.serve.auth import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_PROMPT_CHARS

    sp = add("generate", cmd_generate, "generate text with the kNN-LM, streaming tokens as they come",
             "  knnlm generate 'The history of the' -d ds-wiki\n"
             "  echo 'The history of the' | knnlm generate -d ds-wiki --lambda 0.5 -k 64\n"
             "  knnlm generate 'Once upon a time' --max-new-tokens 100 --sampling-temperature 0.8 --top-p 0.9 "
             "--seed 1\n"
             "  knnlm generate 'The history of the' -d ds-wiki --neighbors 3   # where each token came from\n"
             "  knnlm generate $'Q: What is a fjord?\\nA:' --stop $'\\n' --json   # base LM (no -d), JSON out\n"
             "  knnlm generate 'The history of the' --memory mem-wiki --memory-lambda 0.3   # memory decoder")
    sp.add_argument("prompt", nargs="?", help="the prompt (default: read from standard input)")
    g = sp.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated at most")
    g.add_argument("--sampling-temperature", type=float, default=0.0,
                   help="0 = greedy; otherwise sample from p^(1/T) (the kNN softmax's is --temperature)")
    g.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling: the smallest set with this mass")
    g.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable); not printed")
    g.add_argument("--ignore-eos", action="store_true", help="go on after the end-of-text token")
    g.add_argument("--neighbors", type=int, default=0, help="after the text, each token's N nearest memories")
    g.add_argument("--json", action="store_true", help="print one JSON object (text, tokens, scores) at the end")
    add_knn_args(sp, cache=True)
    add_fewer_searches_args(sp)
    add_memory_args(sp)
    add_model_args(sp)

    sp = add("serve", cmd_serve, "HTTP server: OpenAI-compatible /v1/completions with datastores, /v1/score",
             "  knnlm serve --datastore wiki=ds-wiki\n"
             "  knnlm serve --datastore wiki=ds-wiki --memory wiki-mem=mem-wiki   # requests add \"memory\": \"wiki-mem\"\n"
             "  knnlm serve --datastore wiki=ds-wiki --datastore law=ds-law --port 8001 --max-queue 32\n"
             "  curl -s localhost:8000/v1/completions -H 'content-type: application/json' \\\n"
             "       -d '{\"prompt\": \"The history of\", \"max_tokens\": 20, \"datastore\": \"wiki\", \"lambda\": 0.25}'\n"
             "  curl -s localhost:8000/v1/score -H 'content-type: application/json' -d '{\"text\": \"Some text.\"}'\n"
             "  KNNLM_API_KEY=s3cret knnlm serve -d wiki=ds-wiki --host 0.0.0.0   # clients send "
             "'Authorization: Bearer s3cret'\n"
             "  knnlm serve -d wiki=ds-wiki --default-datastore none   # the base LM unless a request names 'wiki'\n"
             "  lm_eval --model local-completions --model_args base_url=http://127.0.0.1:8000/v1/completions,"
             "tokenizer_backend=huggingface,tokenizer=MODEL_DIR --tasks TASK   # see docs/lm-eval.md\n"
             "  (API docs at http://127.0.0.1:8000/docs; the model is the first datastore's unless --model)")
    sp.add_argument("--datastore", "-d", type=_datastore_spec, action="append", metavar="NAME=PATH",
                    help="a datastore served under NAME (repeatable; all built with the same model)")
    sp.add_argument("--default-datastore", default=None,
                    help="datastore of requests that name none (default: the first; 'none': the base LM)")
    sp.add_argument("--host", default="127.0.0.1",
                    help="address to listen on; other than loopback (e.g. 0.0.0.0) it needs --api-key or --insecure")
    sp.add_argument("--port", type=int, default=8000, help="port")
    sp.add_argument("--max-queue", type=int, default=16, help="requests waiting before new ones get 503")
    sp.add_argument("--max-batch", type=int, default=8,
                    help="completions generated together, one forward step for all (1: one at a time)")
    sp.add_argument("--max-tokens", type=int, default=512, help="largest max_tokens a request may ask")
    sp.add_argument("--served-model-name", default=None, help="model id in the API (default: --model's)")
    a = sp.add_argument_group("access")
    a.add_argument("--api-key", action="append", default=None, metavar="KEY",
                   help="every /v1/* request must send 'Authorization: Bearer KEY' (repeatable; also the "
                        "KNNLM_API_KEY variable, comma-separated); /health stays open")
    a.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without an API key")
    a.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help="larger request bodies get 413, unread")
    a.add_argument("--max-prompt-chars", type=int, default=DEFAULT_MAX_PROMPT_CHARS,
                   help="longer prompts get 400 before tokenizing")
    r = sp.add_argument_group("retrieval defaults (each request may override them)")
    r.add_argument("--lambda", dest="lam", type=float, default=None,
                   help="weight of p_kNN (default: each datastore's tuned lambda, else 0.25)")
    r.add_argument("-k", "--k", type=int, default=None, help="neighbours (default: each datastore's tuned k, else 1024)")
    r.add_argument("--knn-temperature", type=float, default=None,
                   help="kNN softmax temperature (default: each datastore's tuned T, else 1)")
    r.add_argument("--paper-defaults", action="store_true",
                   help="the paper's k=1024, lambda=0.25, T=1 instead of each datastore's tuned settings")
    r.add_argument("--lambda-mode", choices=["adaptive", "fixed"], default=None,
                   help="scoring (echo, logprobs of a prompt): adaptive lambda follows the text, fixed stays as set "
                        "(default: adaptive, fixed when a lambda is given or --paper-defaults); generation: fixed")
    r.add_argument("--index", default=None, help="index name inside each datastore (default: its only index)")
    r.add_argument("--nprobe", type=int, default=None, help="IVF lists probed (default: each index's)")
    r.add_argument("--no-rerank", action="store_true", help="keep approximate (PQ) distances")
    add_cache_args(r, "the sequence's", "each datastore")
    add_fewer_searches_args(sp)
    add_memory_args(sp, serve=True)
    add_model_args(sp)
