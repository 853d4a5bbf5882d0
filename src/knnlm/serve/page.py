"""The inspector page: one HTML file of plain HTML, CSS and JavaScript (knnlm/serve/static),
served at `/` by `knnlm serve` and written with its data embedded by `knnlm explain --html`.

    add_routes(app)                       # GET / on a knnlm server: the page calls /v1/*
    Path("out.html").write_text(render_page({"model": ..., "score": {...}}))   # no server

Served, the page reads /v1/models, /v1/score (with `return_knn`) and /v1/completions, with
the API key it asks for when the server wants one.  Written to a file, `data["score"]` has
the shape of /v1/score's response (knnlm.run.inspect builds it), and the page needs nothing
else: no server, no network.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

_PARTS = ("page.html", "page.css", "page.js")


@lru_cache(maxsize=1)
def _assets() -> tuple[str, str, str]:
    folder = resources.files("knnlm.serve") / "static"
    return tuple(folder.joinpath(name).read_text(encoding="utf-8") for name in _PARTS)


def _embed(data) -> str:
    """JSON that is safe inside a <script> element (no `</script>`, no `<!--`)."""
    return (json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
            .replace("<", "\\u003c").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def render_page(data: dict | None = None) -> str:
    """The page as one HTML document; `data` None: it talks to the server it came from."""
    html, css, js = _assets()
    return (html.replace("/*KNNLM-STYLE*/", css, 1)
            .replace("/*KNNLM-DATA*/", _embed(data) if data is not None else "null", 1)
            .replace("/*KNNLM-SCRIPT*/", js, 1))


def add_routes(app) -> None:
    """GET / (the page) on a knnlm FastAPI app; it is open like /health: its calls to
    /v1/* carry the API key, which the page asks for."""
    from fastapi.responses import HTMLResponse

    @app.get("/", include_in_schema=False)
    async def page():
        return HTMLResponse(render_page(), headers={"Cache-Control": "no-cache",
                                                    "Content-Security-Policy": _CSP})


# The page loads nothing from anywhere: only its own inline script and style, and calls to this server.
_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'")
