"""Cut a token stream into overlapping windows so that every token is scored once."""

from __future__ import annotations

from typing import NamedTuple


class Window(NamedTuple):
    start: int  # first input position
    end: int  # one past the last input position
    score_from: int  # first input position whose prediction is scored


def make_windows(n_tokens: int, window: int = 1024, stride: int = 512) -> list[Window]:
    """Windows over a stream `t[0:n_tokens]` whose first token is context only.

    Window `(s, e, q)` feeds `t[s:e]` to the model; the output at input position p
    predicts `t[p+1]`, and positions `q <= p < e` are scored.  Every target
    t[1], ..., t[n_tokens-1] is scored exactly once, and every scored position after
    the first window sees at least `window - stride` earlier tokens.

    Worked example, n_tokens=9, window=4, stride=2 (x = input, P = input whose next
    token is scored):

        pos      0 1 2 3 4 5 6 7 8
        win 0    P P P P               (0, 4, 0) predicts t1..t4
        win 1        x x P P           (2, 6, 4) predicts t5..t6
        win 2            x x P P       (4, 8, 6) predicts t7..t8

    >>> make_windows(9, 4, 2)
    [Window(start=0, end=4, score_from=0), Window(start=2, end=6, score_from=4), Window(start=4, end=8, score_from=6)]
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in [1, window={window}], got {stride}")
    last = n_tokens - 1  # the last input position that has a target
    out: list[Window] = []
    end = 0
    while end < last:
        new_end = min(end + (window if not out else stride), last)
        start = max(0, new_end - window)
        out.append(Window(start, new_end, end))
        end = new_end
    return out
