"""StopChecker: cut streamed text at the first stop string."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flashlm.errors import InputError
from flashlm.runtime.tokenizer import StopChecker


def run(stops, pieces):
    """Feed pieces; return (emitted pieces, stopped)."""
    sc = StopChecker(stops)
    out = []
    for p in pieces:
        emit, stopped = sc.feed(p)
        out.append(emit)
        if stopped:
            return out, True
    out.append(sc.flush())
    return out, False


def reference(stops, text):
    """Cut before the stop string that completes first (character by character); of two
    completing at the same character, the one that starts first."""
    hits = [(i + len(s), i) for s in stops if (i := text.find(s)) >= 0]
    return (text[:min(hits)[1]], True) if hits else (text, False)


def test_first_to_complete_wins():
    # "b" completes before "aba" could: generation stops there, as it would token by token
    assert run(["b", "aba"], ["aab", "a"]) == (["aa"], True)
    assert run(["b", "aba"], ["aaba"]) == (["aa"], True)
    # same end: the longer (earlier-starting) one is cut
    assert run(["ba", "a"], ["xba"]) == (["x"], True)


def test_no_stops_passes_through():
    sc = StopChecker([])
    assert sc.feed("abc") == ("abc", False)
    assert sc.flush() == ""


def test_stop_in_one_piece():
    sc = StopChecker(["</s>"])
    assert sc.feed("Hello</s>world") == ("Hello", True)
    assert sc.matched == "</s>" and sc.stopped
    assert sc.feed("more") == ("", True)
    assert sc.flush() == ""


def test_stop_across_pieces_is_held_back():
    sc = StopChecker(["\nUser:"])
    assert sc.feed("Hi there!\nUs") == ("Hi there!", False)
    assert sc.feed("er") == ("", False)
    assert sc.feed(": next") == ("", True)


def test_false_alarm_is_released():
    sc = StopChecker(["\nUser:"])
    assert sc.feed("Hi\nUs") == ("Hi", False)
    assert sc.feed("ually") == ("\nUsually", False)
    assert sc.feed("\n") == ("", False)
    assert sc.flush() == "\n"


def test_earliest_stop_wins():
    assert run(["END", "\n\n"], ["a\n\nbEND"]) == (["a"], True)
    assert run(["END", "\n\n"], ["aEN", "D\n\n"]) == (["a", ""], True)


def test_overlapping_prefixes():
    # "aab": after "aaa" only the last "aa" can still start the stop string
    assert run(["aab"], list("aaab")) == (["", "", "a", ""], True)
    assert run(["abab"], ["aba", "bab"]) == (["", ""], True)


def test_single_string_and_duplicates():
    sc = StopChecker("##")
    assert sc.stops == ["##"]
    assert StopChecker(["x", "x"]).stops == ["x"]


@pytest.mark.parametrize("stops", [[""], ["ok", ""], [None]])
def test_bad_stops(stops):
    with pytest.raises(InputError, match="non-empty"):
        StopChecker(stops)


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="ab\n🚀", max_size=30),
       stops=st.lists(st.text(alphabet="ab\n🚀", min_size=1, max_size=4), max_size=3),
       cuts=st.lists(st.integers(0, 30), max_size=8))
def test_matches_reference_for_any_split(text, stops, cuts):
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    sc = StopChecker(stops)
    expected, expected_stop = reference(stops, text)
    emitted, fed = "", ""
    for p in pieces:
        fed += p
        emit, stopped = sc.feed(p)
        emitted += emit
        assert expected.startswith(emitted)  # never emits text a stop string removes
        if stopped:
            break
        # what is held back is only a possible start of a stop string
        held = fed[len(emitted):]
        assert len(held) < max((len(s) for s in stops), default=1)
    if not sc.stopped:
        emitted += sc.flush()
    assert (emitted, sc.stopped) == (expected, expected_stop)
