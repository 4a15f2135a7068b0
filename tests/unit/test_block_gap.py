"""How soon a node restarts to refuse the next banned peer (services.runtime.content._embedded.block_gap).

Each second a flooding peer is not yet refused grows the node's heap by megabytes, and each
restart interrupts fetches and tunnels: the first gaps are short, and a swarm of identities
banned one after another gets restarts no more often than every 8 s."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from services.runtime.content._embedded import block_gap


def test_the_first_block_restarts_at_once_and_the_next_ones_soon() -> None:
    assert block_gap(0) == 0.0
    assert block_gap(1) == 0.25  # a flood from two identities, banned a moment apart: cut within about a second
    assert [block_gap(n) for n in range(2, 8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]


@given(st.integers(min_value=-3, max_value=10_000))
def test_gaps_never_shrink_while_blocks_keep_coming_and_stay_bounded(n: int) -> None:
    assert 0.0 <= block_gap(n) <= block_gap(n + 1) <= 8.0


def test_a_sybil_swarm_gets_at_most_a_restart_every_8_s_after_a_few() -> None:
    # 60 identities banned one after another: the restarts the node can be made to do in the first minute.
    at, restarts = 0.0, 0
    while at <= 60.0:
        restarts += 1
        at += block_gap(restarts)
    assert restarts <= 12
