"""Route planning over published records: the cheapest chain by the DESIGN.md §5 cost model."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from swarm.router import NoRouteError, estimate_ms, plan_route, stage_cost_ms


@dataclass(frozen=True)
class Rec:
    peer_id: str
    layers: tuple[int, int]
    throughput: float = 1000.0
    load: float = 0.0
    n_layers: int = 30
    public_key: bytes = b"k" * 32

    @property
    def address(self) -> str:
        return f"127.0.0.1:{1000 + sum(map(ord, self.peer_id))}"


def ranges(route) -> list[tuple[int, int]]:
    return [hop.layers for hop in route]


def test_one_peer_holding_everything_beats_a_chain():
    records = [Rec("whole", (0, 30)), Rec("a", (0, 10)), Rec("b", (10, 20)), Rec("c", (20, 30))]
    route = plan_route(records, 30, rtt_ms={"whole": 1, "a": 1, "b": 1, "c": 1})
    assert [hop.peer_id for hop in route] == ["whole"]


def test_chain_covers_every_layer_in_order():
    records = [Rec("c", (20, 30)), Rec("a", (0, 10)), Rec("b", (10, 20))]
    route = plan_route(records, 30, rtt_ms={"a": 0, "b": 1, "c": 1})
    assert ranges(route) == [(0, 10), (10, 20), (20, 30)]


def test_faster_and_nearer_peers_win():
    records = [
        Rec("slow", (10, 20), throughput=50),
        Rec("fast", (10, 20), throughput=5000),
        Rec("a", (0, 10)),
        Rec("c", (20, 30)),
    ]
    assert plan_route(records, 30, rtt_ms={"slow": 1, "fast": 1})[1].peer_id == "fast"
    records = [Rec("far", (10, 20)), Rec("near", (10, 20)), Rec("a", (0, 10)), Rec("c", (20, 30))]
    assert plan_route(records, 30, rtt_ms={"far": 80, "near": 2})[1].peer_id == "near"


def test_busy_peer_loses_to_an_idle_one():
    records = [Rec("busy", (10, 20), load=8), Rec("idle", (10, 20)), Rec("a", (0, 10)), Rec("c", (20, 30))]
    assert plan_route(records, 30, rtt_ms={"busy": 1, "idle": 1})[1].peer_id == "idle"


def test_excluded_peer_is_avoided_and_a_gap_is_named():
    b = Rec("b", (10, 20))
    records = [Rec("a", (0, 10)), b, Rec("b2", (10, 20)), Rec("c", (20, 30))]
    assert plan_route(records, 30, exclude=[b.address])[1].peer_id == "b2"
    with pytest.raises(NoRouteError, match="layers 10-30"):
        plan_route([Rec("a", (0, 10)), Rec("c", (20, 30))], 30, model_id="m")


def test_records_of_another_layout_are_ignored():
    with pytest.raises(NoRouteError):
        plan_route([Rec("x", (0, 24), n_layers=24)], 30)


def test_estimate_is_the_cost_model():
    record = Rec("a", (0, 10), throughput=1000)
    # 10 layers at 1000 layers/s = 10 ms, + RTT/2 = 2 ms, + hop cost 3 ms.
    assert stage_cost_ms(record, 4.0, 3.0) == pytest.approx(15.0)
    route = plan_route(
        [record, Rec("b", (10, 30), throughput=2000)], 30, rtt_ms={"a": 4, "b": 4}, hop_cost_ms=3
    )
    assert estimate_ms(route) == pytest.approx(15.0 + 10.0 + 2.0 + 3.0)


@given(st.lists(st.tuples(st.integers(0, 11), st.integers(1, 12), st.floats(1, 1e4)), max_size=12))
def test_any_route_found_is_contiguous_and_complete(specs):
    records = [Rec(f"p{i}", (a, b), throughput=t, n_layers=12) for i, (a, b, t) in enumerate(specs) if a < b]
    try:
        route = plan_route(records, 12)
    except NoRouteError:
        return
    edge = 0
    for hop in route:
        assert hop.layers[0] == edge
        edge = hop.layers[1]
    assert edge == 12
