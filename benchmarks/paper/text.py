"""Small pieces of the results page's text."""

from __future__ import annotations


def yes(b: bool) -> str:
    return "**held**" if b else "**did not hold**"


def f3(x) -> str:
    return f"{x:.3f}"


def pct(a, b) -> str:
    return f"{100 * (a / b - 1):+.1f}%"


def why(lines: list[str]) -> list[str]:
    return ["**Why not:** " + " ".join(lines), ""] if lines else []
