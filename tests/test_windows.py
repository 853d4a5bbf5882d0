import pytest

from knnlm.core.windows import Window, make_windows


def scored_targets(ws):
    return [p + 1 for s, e, q in ws for p in range(q, e)]


def test_gold_list():
    """n=9, W=4, S=2: inputs [0,4) predict t1..t4; [2,6) scores t5,t6; [4,8) scores t7,t8."""
    assert make_windows(9, 4, 2) == [Window(0, 4, 0), Window(2, 6, 4), Window(4, 8, 6)]


def test_gold_list_short_last_window_keeps_full_context():
    """n=8, W=4, S=2: last window is [3,7) scoring t7 only, with 3 tokens of context."""
    assert make_windows(8, 4, 2) == [Window(0, 4, 0), Window(2, 6, 4), Window(3, 7, 6)]


def test_too_short_streams():
    assert make_windows(0, 4, 2) == []
    assert make_windows(1, 4, 2) == []
    assert make_windows(2, 4, 2) == [Window(0, 1, 0)]


@pytest.mark.parametrize("n", [2, 3, 5, 17, 100, 1025, 3000])
@pytest.mark.parametrize("w,s", [(4, 2), (4, 4), (4, 1), (16, 5), (1024, 512)])
def test_every_target_once_with_context(n, w, s):
    ws = make_windows(n, w, s)
    assert scored_targets(ws) == list(range(1, n))
    for i, (start, end, q) in enumerate(ws):
        assert end - start <= w
        assert start <= q < end
        if i > 0:
            assert q - start >= w - s  # left context of the first scored position


def test_bad_arguments():
    with pytest.raises(ValueError):
        make_windows(10, 4, 5)
    with pytest.raises(ValueError):
        make_windows(10, 0, 1)
