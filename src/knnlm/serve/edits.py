"""Live edits of a served datastore: add and remove documents without a restart.

    POST /v1/datastores/{name}/add       {"documents": [{"title": ..., "text": ...}, ...]}
    POST /v1/datastores/{name}/remove    {"documents": [ids], "titles": [...], "sources": [...],
                                          "match": "title regex", "dry_run": false}
    GET  /v1/datastores/{name}           version, entries, removed documents, the edit log

The routes stay out of the OpenAPI schema (request generators read it: they would edit).
Edits need a server started with API keys (every /v1 call then carries one); without keys
they are refused (403).  An edit runs on the model's thread, between other requests, and
the edited datastore replaces the served one in one step (`KNNLM.reload_datastore`): a
request sees it wholly before or wholly after.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from pydantic import BaseModel, Field

from knnlm.errors import KnnlmError
from knnlm.serve.openai import HTTPError

MAX_DOCUMENTS = 10_000  # documents one request may add


class NewDocument(BaseModel):
    text: str = Field(min_length=1)
    title: str = ""


class AddRequest(BaseModel):
    documents: list[NewDocument] = Field(min_length=1, max_length=MAX_DOCUMENTS)


class RemoveRequest(BaseModel):
    documents: list[int] = Field(default_factory=list, description="document ids")
    titles: list[str] = Field(default_factory=list, description="exact titles")
    sources: list[str] = Field(default_factory=list, description="corpus files the documents came from")
    match: str | None = Field(default=None, description="a regular expression searched in titles")
    dry_run: bool = Field(default=False, description="list the documents that would go; change nothing")


def add_edit_routes(app, api_keys) -> None:
    """The edit routes on a knnlm FastAPI app (`app.state.knnlm`, `app.state.worker`)."""
    knnlm, worker = app.state.knnlm, app.state.worker

    def served(name: str):
        if not api_keys:
            raise HTTPError(403, "live edits need a server started with API keys (--api-key KEY): this one has none",
                            code="edits_need_api_keys")
        if name not in knnlm.searchers:
            raise HTTPError(404, f"unknown datastore {name!r} (loaded: {', '.join(knnlm.searchers) or 'none'})",
                            "datastore", "datastore_not_found")
        return knnlm.searchers[name].ds

    async def on_model_thread(fn):
        """Run fn() on the model's thread, in turn with the other requests; its KnnlmError is a 400."""
        job = worker.submit(lambda: iter([fn()]))
        item = await job.out.get()
        if isinstance(item, KnnlmError):
            raise HTTPError(400, str(item))
        if isinstance(item, Exception):
            raise item
        return item

    def describe(name: str) -> dict:
        ds = knnlm.searchers[name].ds
        return {"object": "datastore", "name": name, "path": str(ds.path), "version": getattr(ds, "version", 0),
                "entries": ds.count, "live_entries": getattr(ds, "live", ds.count), "documents": len(ds.docs),
                "removed": ds.meta.get("removed", []), "edits": ds.meta.get("edits", [])}

    @app.get("/v1/datastores/{name}", include_in_schema=False,
             summary="a served datastore's version, size and edit log")
    async def datastore(name: str):
        served(name)
        return describe(name)

    @app.post("/v1/datastores/{name}/remove", include_in_schema=False,
              summary="remove documents: no search returns them from then on")
    async def remove(name: str, req: RemoveRequest):
        from knnlm.core.edit import remove_documents, select_documents

        ds = served(name)

        def work():
            docs = select_documents(ds, req.documents, req.titles, req.sources, req.match)
            if req.dry_run:
                return {"dry_run": True, "documents": [{"document": d, **ds.doc_info[d]} for d in docs]}
            entry = remove_documents(ds.path, docs)
            knnlm.reload_datastore(name)
            return {"edit": entry}

        return {**await on_model_thread(work), "datastore": describe(name)}

    @app.post("/v1/datastores/{name}/add", include_in_schema=False,
              summary="add documents: one forward pass over them, no retraining")
    async def add(name: str, req: AddRequest):
        from knnlm.scale.edit import add_documents

        ds = served(name)

        def work():
            with tempfile.TemporaryDirectory() as tmp:
                f = Path(tmp) / "added.jsonl"
                f.write_text("".join(json.dumps(d.model_dump()) + "\n" for d in req.documents), encoding="utf-8")
                entry = add_documents(knnlm.lm, ds.path, [f], progress=False)
            knnlm.reload_datastore(name)
            return {"edit": entry}

        return {**await on_model_thread(work), "datastore": describe(name)}

