"""The pure transition table: every pair of states, terminal states, and ``sources_of``."""

from __future__ import annotations

import doctest
import itertools
from pathlib import Path

import pytest

import jobs.states
from jobs.errors import IllegalTransition, JobStoreError
from jobs.states import TERMINAL, TRANSITIONS, State, check_transition, sources_of

P, R, G, D, F = State.PENDING, State.RUNNING, State.GENERATED, State.DONE, State.FAILED
W = State.WITHDRAWN

# Written out by hand from the theory of operation, independently of TRANSITIONS, so that a
# change to the table has to be made twice (here and there) on purpose.
ALLOWED = {
    (P, R),  # claim
    (R, P),  # transient error, release, reclaim
    (R, G),  # the API answered
    (R, F),  # permanent error, attempts exhausted
    (G, G),  # download retry, new download lease
    (G, D),  # file verified and in place
    (G, P),  # image URL expired: generate again
    (G, F),  # download can never succeed
    (F, P),  # `batcher retry`
    (F, G),  # `batcher retry` of a failed download whose image URL is still valid
    (P, W),  # the row left the manifest
    (G, W),
    (D, W),
    (F, W),
    (W, P),  # the row came back: where its record says it was
    (W, G),
    (W, D),
    (W, F),
    (D, P),  # `batcher redo`: the image is kept under history/, the job made again
}
ALL_PAIRS = list(itertools.product(State, State))
DISALLOWED = [pair for pair in ALL_PAIRS if pair not in ALLOWED]


def test_states_are_the_six_of_the_theory() -> None:
    assert [s.value for s in State] == [
        "pending",
        "running",
        "generated",
        "done",
        "failed",
        "withdrawn",
    ]
    assert State("generated") is G
    assert f"{P}" == "pending"  # StrEnum: formats as its value (used in SQL and messages)


def test_table_has_a_row_for_every_state() -> None:
    assert set(TRANSITIONS) == set(State)
    assert all(isinstance(v, frozenset) for v in TRANSITIONS.values())


def test_table_is_exactly_the_allowed_pairs() -> None:
    assert {(s, d) for s, targets in TRANSITIONS.items() for d in targets} == ALLOWED


@pytest.mark.parametrize(("src", "dst"), sorted(ALLOWED))
def test_allowed_pair_passes(src: State, dst: State) -> None:
    check_transition(src, dst)  # does not raise


@pytest.mark.parametrize(("src", "dst"), DISALLOWED)
def test_disallowed_pair_raises(src: State, dst: State) -> None:
    with pytest.raises(IllegalTransition) as info:
        check_transition(src, dst)
    assert isinstance(info.value, JobStoreError)
    assert str(info.value) == f"a job cannot go from {src.value} to {dst.value}"


def test_every_pair_is_classified_once() -> None:
    assert len(ALLOWED) + len(DISALLOWED) == len(State) ** 2 == 36


def test_terminal_states() -> None:
    assert frozenset({D, F}) == TERMINAL
    assert TRANSITIONS[D] == frozenset({P, W})  # a redo, or the manifest losing the row
    # failed leaves only when the user asks for a retry, or with the manifest's row
    assert TRANSITIONS[F] <= {P, G, W}
    assert R not in sources_of(W)  # a job a live run holds is never withdrawn under it
    for state in set(State) - TERMINAL:
        assert TRANSITIONS[state], f"{state} is not terminal but has no way out"


def test_every_state_is_reachable_from_pending() -> None:
    seen, frontier = {P}, [P]
    while frontier:
        for nxt in TRANSITIONS[frontier.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                frontier.append(nxt)
    assert seen == set(State)


def test_every_non_terminal_state_can_reach_done() -> None:
    for start in set(State) - {D}:
        seen, frontier = {start}, [start]
        while frontier:
            for nxt in TRANSITIONS[frontier.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    frontier.append(nxt)
        assert D in seen, f"{start} can never become done"


@pytest.mark.parametrize("dst", list(State))
def test_sources_of_inverts_the_table(dst: State) -> None:
    expected = frozenset(src for src, d in ALLOWED if d == dst)
    assert sources_of(dst) == expected
    assert isinstance(sources_of(dst), frozenset)


def test_sources_of_spot_values() -> None:
    assert sources_of(R) == {P}
    assert sources_of(D) == {G, W}
    assert sources_of(P) == {R, G, F, W, D}
    assert sources_of(G) == {R, G, F, W}
    assert sources_of(F) == {R, G, W}
    assert sources_of(W) == {P, G, D, F}


def test_module_is_pure() -> None:
    """The state table imports nothing that does I/O (STYLE: pure modules)."""
    source = Path(jobs.states.__file__).read_text(encoding="utf-8")
    imports = {
        line.split()[1]
        for line in source.splitlines()
        if line.startswith(("import ", "from ")) and not line.startswith("from __future__")
    }
    assert imports <= {"enum", ".errors"}


def test_doctests() -> None:
    assert doctest.testmod(jobs.states).failed == 0
