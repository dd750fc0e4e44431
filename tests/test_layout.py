"""The cache layout's memory operations and saved state, case by case (no model needed).

Whole streams are covered by the properties in test_policies_property.py; these pin down the
exact operations of each rule, which StreamCache hands to llama.cpp as they are.
"""

from __future__ import annotations

import pytest

from edgesink.layout import CacheLayout, EncodeKeptFresh, Remove, Shift, state_problem, turn_cut


def layout_with(kept: int, window: int, *, kept_forward: bool = True, rebase_every: int = 100,
                refresh_every: int = 100) -> CacheLayout:
    """A layout holding tokens 0.. : ``kept`` kept ones, then ``window`` window ones."""
    layout = CacheLayout(kept_forward=kept_forward, rebase_every=rebase_every, refresh_every=refresh_every)
    layout.append(range(kept + window), kept)
    return layout


def test_kept_forward_eviction_moves_the_kept_cells_up():
    layout = layout_with(2, 5)
    assert layout.evict(3) == [Remove(2, 5), Shift(0, 2, 3)]
    assert (layout.kept, list(layout.window), layout.w0) == ([0, 1], [5, 6], 5)
    assert (layout.counters.evicted, layout.counters.shifts, layout.shifts_since_refresh) == (3, 1, 1)


def test_window_back_eviction_moves_the_window_down():
    layout = layout_with(2, 5, kept_forward=False)
    assert layout.evict(3) == [Remove(2, 5), Shift(5, -1, -3)]
    assert (layout.w0, layout.next_pos) == (2, 4)


def test_without_kept_tokens_nothing_shifts_forward():
    layout = layout_with(0, 5)
    assert layout.evict(2) == [Remove(0, 2)]
    assert (layout.w0, layout.counters.shifts) == (2, 0)


def test_a_rebase_removes_the_kept_cells_before_the_window_moves_over_them():
    layout = layout_with(2, 5, rebase_every=3)
    assert layout.evict(3) == [Remove(2, 5), Shift(0, 2, 3),
                               Remove(3, 5), Shift(5, -1, -3), EncodeKeptFresh(0, (0, 1))]
    assert (layout.w0, layout.shifts_since_refresh, layout.counters.rebases) == (2, 0, 1)


def test_a_rebase_without_kept_tokens_still_hands_over_the_empty_scratch():
    layout = layout_with(0, 5, rebase_every=2)
    assert layout.evict(2) == [Remove(0, 2), Remove(2, 2), Shift(2, -1, -2), EncodeKeptFresh(0, ())]


def test_the_kept_tokens_are_refreshed_every_refresh_every_shifts():
    layout = layout_with(2, 8, refresh_every=2)
    assert layout.evict(1) == [Remove(2, 3), Shift(0, 2, 1)]
    assert layout.evict(1) == [Remove(3, 4), Shift(1, 3, 1), Remove(2, 4), EncodeKeptFresh(2, (0, 1))]
    assert (layout.counters.refreshes, layout.shifts_since_refresh) == (1, 0)


def test_evict_refuses_more_than_the_window_and_ignores_nothing():
    layout = layout_with(2, 3)
    assert layout.evict(0) == []
    with pytest.raises(ValueError):
        layout.evict(4)
    assert layout.tokens() == [0, 1, 2, 3, 4]


def test_drop_newest_takes_the_window_first_then_kept_tokens():
    layout = layout_with(3, 2)
    assert layout.drop_newest(4) == [Remove(1, -1)]
    assert (layout.kept, list(layout.window), layout.w0) == ([0], [], 1)
    with pytest.raises(ValueError):
        layout.drop_newest(2)


def test_push_newest_puts_a_token_back_where_it_was():
    layout = layout_with(2, 0)
    layout.drop_newest(1)
    layout.push_newest(1, kept=True)
    assert (layout.kept, layout.w0) == ([0, 1], 2)
    layout.append([2], 2)
    with pytest.raises(ValueError):
        layout.push_newest(3, kept=True)


def test_adopt_kept_takes_the_oldest_window_tokens():
    layout = layout_with(1, 4)
    layout.adopt_kept(3)
    assert (layout.kept, list(layout.window), layout.w0, layout.next_pos) == ([0, 1, 2], [3, 4], 3, 5)


def test_a_rebuild_starts_the_kept_tokens_at_zero():
    layout = layout_with(2, 4)
    layout.evict(2)
    layout.drop_oldest(1)
    layout.restart_positions()
    assert (layout.w0, layout.counters.rebuilds, layout.counters.evicted) == (2, 1, 3)


# -- saved state -----------------------------------------------------------------------------------------

def saved(**changes) -> dict:
    state = layout_with(2, 3).state()
    state.update(changes)
    return state


def test_state_round_trips():
    layout = layout_with(2, 5, rebase_every=4, refresh_every=1)
    layout.evict(2)
    state = layout.state()
    assert set(state) == {"kept", "window", "w0", "counters", "shifts_since_refresh"}
    again = CacheLayout.from_state(state, kept_forward=True, rebase_every=4, refresh_every=1)
    assert again.state() == state
    assert again.evict(1) == layout.evict(1)


def test_older_files_without_shifts_since_refresh_load():
    state = saved()
    del state["shifts_since_refresh"]
    assert state_problem(state, n_ctx=8, n_vocab=10) is None
    assert CacheLayout.from_state(state, kept_forward=True, rebase_every=4, refresh_every=1).shifts_since_refresh == 0


@pytest.mark.parametrize(("changes", "problem"), [
    ({"kept": (0, 1)}, "kept and window must be lists"),
    ({"window": [2, 3, 10]}, "cached tokens"),  # out of the vocabulary
    ({"window": [2, True]}, "cached tokens"),  # JSON true is no token
    ({"window": list(range(2, 9))}, "cached tokens"),  # more than n_ctx
    ({"w0": 1}, "w0"),
    ({"w0": 2.0}, "w0"),
    ({"counters": {"evicted": -1}}, "counters"),
    ({"counters": {"moved": 1}}, "counters"),
    ({"counters": {"shifts": False}}, "counters"),
    ({"counters": {"evicted": 1.0}}, "counters"),
    ({"counters": [1]}, "counters"),
    ({"shifts_since_refresh": -1}, "shifts_since_refresh"),
    ({"shifts_since_refresh": None}, "shifts_since_refresh"),
])
def test_state_problem_names_the_faulty_field(changes, problem):
    assert state_problem(saved(**changes), n_ctx=8, n_vocab=10) == problem


def test_state_problem_accepts_a_float_decode_time_and_partial_counters():
    assert state_problem(saved(counters={"decode_seconds": 1.5, "tokens_decoded": 3}), n_ctx=8, n_vocab=10) is None


def test_the_turn_cut_starts_the_window_at_a_message():
    """The window holds stream indices 100..199; messages begin at 90 (evicted), 130, 150 and 185."""
    starts = [90, 130, 150, 185]
    cut = lambda n, needed: turn_cut(n, needed, starts, window_start=100, n_window=100)  # noqa: E731
    assert cut(10, 5) == 30  # forward to the first message start at or after what the policy asks
    assert cut(40, 5) == 50
    assert cut(90, 60) == 85  # none at or after 90 in the window: back to the last one at or after needed
    assert cut(90, 88) == 90  # neither: the policy's cut, inside the newest message
    assert turn_cut(10, 5, [], window_start=100, n_window=100) == 10  # no chat messages: the policy's cut
    assert turn_cut(10, 5, [90, 95], window_start=100, n_window=100) == 10  # evicted starts are no place to cut
    assert starts == [90, 130, 150, 185]  # pure: the starts are left as they were
