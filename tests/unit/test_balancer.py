"""The balancer's pure parts: fair shares, which partition to give back, registrations."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import pytest
from hypothesis import given
from hypothesis import strategies as st

from linechatd.balancer import (
    Member,
    Plan,
    View,
    drain_stagger,
    effective_members,
    equal_quotas,
    fair_shares,
    member_from_json,
    pick_release,
    plan,
    quotas,
)
from linechatd.ownership import InstanceInfo, ZkPaths, owner_from_node, partition_view, rank_key
from linechatd.zk import NodeStat

# -- fair_shares ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("partitions", "instances", "share"),
    [(8, 1, 8), (8, 2, 4), (8, 3, 3), (4, 3, 2), (64, 5, 13), (1, 4, 1), (3, 3, 1)],
)
def test_equal_weights_get_ceil_of_partitions_over_live(
    partitions: int, instances: int, share: int
) -> None:
    members = {f"gw-{i}": Member() for i in range(instances)}
    assert fair_shares(partitions, members) == {m: share for m in members}
    assert share == math.ceil(partitions / instances)


def test_no_members_no_shares() -> None:
    assert fair_shares(8, {}) == {}


def test_a_cap_spreads_the_surplus_over_the_others() -> None:
    members = {"a": Member(max_partitions=1), "b": Member(), "c": Member()}
    assert fair_shares(8, members) == {"a": 1, "b": 4, "c": 4}


def test_a_cap_above_the_share_changes_nothing() -> None:
    members = {"a": Member(max_partitions=5), "b": Member()}
    assert fair_shares(8, members) == {"a": 4, "b": 4}


def test_caps_that_cannot_cover_every_partition() -> None:
    members = {"a": Member(max_partitions=2), "b": Member(max_partitions=3)}
    assert fair_shares(8, members) == {"a": 2, "b": 3}


def test_weights_are_proportional() -> None:
    members = {"big": Member(weight=3.0), "small": Member(weight=1.0)}
    assert fair_shares(8, members) == {"big": 6, "small": 2}


def test_weight_zero_holds_nothing() -> None:
    members = {"a": Member(weight=0.0), "b": Member(), "c": Member()}
    assert fair_shares(8, members) == {"a": 0, "b": 4, "c": 4}


def test_only_weight_zero_members() -> None:
    assert fair_shares(8, {"a": Member(weight=0.0)}) == {"a": 0}


def test_same_result_whatever_the_member_order() -> None:
    members = {"a": Member(weight=2.0, max_partitions=3), "b": Member(), "c": Member(weight=0.5)}
    reordered = dict(reversed(list(members.items())))
    assert fair_shares(16, members) == fair_shares(16, reordered)


members_strategy = st.dictionaries(
    st.text("abcdefgh", min_size=1, max_size=3),
    st.builds(
        Member,
        weight=st.sampled_from([0.0, 0.5, 1.0, 1.0, 1.0, 2.0, 3.5]),
        max_partitions=st.integers(min_value=0, max_value=20),
    ),
    max_size=8,
)


@given(partitions=st.integers(min_value=1, max_value=4096), members=members_strategy)
def test_fair_share_invariants(partitions: int, members: dict[str, Member]) -> None:
    shares = fair_shares(partitions, members)
    assert set(shares) == set(members)
    for name, member in members.items():
        share = shares[name]
        assert 0 <= share <= partitions
        if member.weight == 0:
            assert share == 0
        if member.max_partitions:
            assert share <= member.max_partitions
    # Every partition can find an owner whenever the caps allow it.
    capacity = sum((m.max_partitions or partitions) for m in members.values() if m.weight > 0)
    assert sum(shares.values()) >= min(partitions, capacity)
    # A heavier uncapped member never gets less than a lighter one.
    uncapped = [(m.weight, shares[n]) for n, m in members.items() if not m.max_partitions]
    for weight_a, share_a in uncapped:
        for weight_b, share_b in uncapped:
            if weight_a > weight_b:
                assert share_a >= share_b


@given(partitions=st.integers(min_value=1, max_value=512), n=st.integers(min_value=1, max_value=9))
def test_equal_members_overshoot_by_less_than_one_each(partitions: int, n: int) -> None:
    shares = fair_shares(partitions, {str(i): Member() for i in range(n)})
    assert partitions <= sum(shares.values()) < partitions + n


# -- pick_release -----------------------------------------------------------------


def test_release_gives_back_the_partition_with_fewest_sessions() -> None:
    assert pick_release({0: 5, 1: 0, 2: 3}) == 1


def test_release_tie_breaks_deterministically() -> None:
    assert pick_release({0: 1, 3: 1, 7: 2}) == 3


# -- registrations ----------------------------------------------------------------


def _registration(**extra: object) -> bytes:
    return InstanceInfo("gw-1", "ws://h:1/ws", "http://h:2").to_json(**extra)


def test_member_from_registration() -> None:
    assert member_from_json(_registration(weight=2.5, max_partitions=7)) == Member(2.5, 7)


def test_member_defaults_when_fields_missing() -> None:
    assert member_from_json(_registration()) == Member()


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"[1, 2]",
        json.dumps({"weight": "heavy"}).encode(),
        json.dumps({"weight": -1}).encode(),
        json.dumps({"max_partitions": -3}).encode(),
        b'{"weight": NaN}',
        b'{"weight": Infinity}',
    ],
)
def test_unreadable_registrations_count_as_defaults(data: bytes) -> None:
    assert member_from_json(data) == Member()


# -- ownership records ------------------------------------------------------------


def _stat(czxid: int, ctime: int = 1_700_000_000_123, owner: int = 0x1234) -> NodeStat:
    return NodeStat(czxid=czxid, mzxid=czxid, ctime_ms=ctime, version=0, ephemeral_owner=owner)


def test_paths() -> None:
    paths = ZkPaths("prod")
    assert paths.meta == "/linechat/prod/meta"
    assert paths.owner(3) == "/linechat/prod/partitions/3/owner"
    assert paths.partition(3) == "/linechat/prod/partitions/3"
    assert paths.instance("gw-1") == "/linechat/prod/instances/gw-1"


def test_owner_epoch_is_the_creation_zxid() -> None:
    owner = owner_from_node(_registration(acquired_at_ms=1), _stat(czxid=4711))
    assert owner is not None
    assert (owner.instance, owner.epoch, owner.session_id) == ("gw-1", 4711, 0x1234)
    view = partition_view(5, owner)
    assert view["partition"] == 5
    assert view["owner"] == "gw-1"
    assert view["epoch"] == 4711
    assert view["since"] == pytest.approx(1_700_000_000.123)
    assert view["ws_url"] == "ws://h:1/ws"


def test_foreign_lease_data_still_counts_as_owned() -> None:
    owner = owner_from_node(b"\xff garbage", _stat(czxid=9))
    assert owner is not None and owner.instance == "?" and owner.epoch == 9


def test_missing_node_means_no_owner() -> None:
    assert owner_from_node(None, None) is None
    assert partition_view(2, None) == {
        "partition": 2,
        "owner": None,
        "instance": None,
        "ws_url": None,
        "http_url": None,
        "epoch": None,
        "since": None,
        "since_ms": None,
    }


def test_drain_stagger_fits_the_grace_period() -> None:
    # Few partitions: the configured stagger as it is.
    assert drain_stagger(0.5, 30.0, 8) == 0.5
    assert drain_stagger(0.5, 30.0, 1) == 0.5
    assert drain_stagger(0.5, 30.0, 0) == 0.5
    # 64 partitions at 0.5 s would take 31.5 s of a 30 s grace period: shortened
    # so that the releases take two thirds of it.
    assert drain_stagger(0.5, 30.0, 64) == pytest.approx(20.0 / 63)
    assert drain_stagger(0.0, 30.0, 64) == 0.0


@given(
    configured=st.floats(0, 60),
    grace=st.floats(0, 3600),
    held=st.integers(0, 10_000),
)
def test_drain_stagger_never_exceeds_either_bound(
    configured: float, grace: float, held: int
) -> None:
    stagger = drain_stagger(configured, grace, held)
    assert 0 <= stagger <= configured
    assert stagger * max(0, held - 1) <= grace * 2 / 3 + 1e-9 or held <= 1


# -- quotas -------------------------------------------------------------------------


def ranked(members: Mapping[str, Member]) -> list[str]:
    return sorted(members, key=lambda m: (rank_key(m), m))


def test_quotas_sum_to_the_partitions_and_differ_by_at_most_one() -> None:
    members = {f"gw-{i}": Member() for i in range(1000)}
    table = quotas(4096, members)
    assert sum(table.values()) == 4096
    assert sorted(set(table.values())) == [4, 5]
    # The 96 extra partitions go to the first members in rank order.
    assert [m for m in ranked(members) if table[m] == 5] == ranked(members)[:96]


def test_quotas_with_weights_and_caps() -> None:
    members = {"gw-0": Member(weight=2.0), "gw-1": Member(), "gw-2": Member(max_partitions=1)}
    assert quotas(7, members) == {"gw-0": 4, "gw-1": 2, "gw-2": 1}
    capped = {"a": Member(max_partitions=2), "b": Member(max_partitions=3)}
    assert quotas(8, capped) == {"a": 2, "b": 3}
    assert quotas(8, {"a": Member(weight=0.0), "b": Member()}) == {"a": 0, "b": 8}
    assert quotas(8, {}) == {}


@given(partitions=st.integers(min_value=1, max_value=4096), members=members_strategy)
def test_quota_invariants(partitions: int, members: dict[str, Member]) -> None:
    table = quotas(partitions, members)
    assert set(table) == set(members)
    capacity = sum((m.max_partitions or partitions) for m in members.values() if m.weight > 0)
    assert sum(table.values()) == min(partitions, capacity)
    ceiling = fair_shares(partitions, members)
    for name, member in members.items():
        assert 0 <= table[name] <= ceiling[name]
        if member.max_partitions:
            assert table[name] <= member.max_partitions
        if member.weight == 0:
            assert table[name] == 0


@given(
    partitions=st.integers(min_value=1, max_value=4096),
    names=st.sets(st.text("abcdefghij", min_size=1, max_size=4), min_size=1, max_size=40),
    newcomer=st.text("klmnop", min_size=1, max_size=4),
)
def test_equal_quotas_move_one_way_when_an_instance_joins(
    partitions: int, names: set[str], newcomer: str
) -> None:
    before = {m: Member() for m in names}
    after = before | {newcomer: Member()}
    old, new = quotas(partitions, before), quotas(partitions, after)
    # A join only ever lowers quotas, so it only makes instances give back.
    assert all(new[m] <= old[m] for m in before)
    # And the fast path for equal members agrees with the general one.
    assert equal_quotas(partitions, ranked(after)) == new


# -- plan ---------------------------------------------------------------------------


def view_for(
    me: str,
    table: Mapping[str, int],
    held: Mapping[str, int],
    free: list[int],
    mine: Mapping[int, int] | None = None,
    **kw: object,
) -> View:
    return View(
        me=me,
        quotas=table,
        order=ranked({m: Member() for m in table}),
        held=held,
        free=free,
        mine=mine if mine is not None else {k: 0 for k in range(held.get(me, 0))},
        **kw,  # type: ignore[arg-type]
    )


@given(
    partitions=st.integers(min_value=1, max_value=300),
    names=st.sets(st.text("abcdefgh", min_size=1, max_size=3), min_size=1, max_size=12),
    data=st.data(),
)
def test_free_partitions_are_dealt_to_exactly_one_taker_each(
    partitions: int, names: set[str], data: st.DataObject
) -> None:
    members = {m: Member() for m in names}
    table = quotas(partitions, members)
    # Some partitions held (each member at most its quota), the rest free.
    held = {m: data.draw(st.integers(0, table[m])) for m in names}
    free = list(range(sum(held.values()), partitions))
    taken: list[int] = []
    for m in names:
        decided = plan(view_for(m, table, held, free, take_per_step=partitions))
        assert decided.release == ()
        assert len(decided.take) <= table[m] - held[m]
        taken += decided.take
    # Nobody takes what another takes, and together they take every free one.
    assert len(taken) == len(set(taken))
    assert sorted(taken) == free


def test_a_surplus_is_given_back_only_when_someone_lacks_partitions() -> None:
    table = {"a": 2, "b": 2}
    held = {"a": 3, "b": 1}
    sessions = {0: 5, 1: 0, 2: 3}
    # b lacks one and nothing is free: a gives back its emptiest partition.
    decided = plan(view_for("a", table, held, [], mine=sessions))
    assert decided == Plan(release=(1,))
    # b lacks one, and one is free: b takes that, a keeps its three.
    assert plan(view_for("a", table, {"a": 3, "b": 1}, [7], mine=sessions)) == Plan()
    assert plan(view_for("b", table, held, [7])) == Plan(take=(7,))


def test_nothing_is_taken_while_a_cold_cluster_settles() -> None:
    table = {"a": 4}
    assert plan(view_for("a", table, {"a": 0}, [0, 1, 2, 3], settling=True)) == Plan()


def test_a_partition_dealt_to_nobody_is_taken_after_the_fallback_delay() -> None:
    # Everyone at quota (views disagree): partition 9 is dealt to nobody.
    table = {"a": 1, "b": 1}
    held = {"a": 1, "b": 1}
    young = view_for("a", table, held, [9], free_for=[0.5], fallback_s=1.0, room=2)
    assert plan(young) == Plan()
    old = view_for("a", table, held, [9], free_for=[1.5], fallback_s=1.0, room=2)
    assert plan(old) == Plan(take=(9,))
    # No room under the ceiling share: still nothing.
    full = view_for("a", table, held, [9], free_for=[9.0], fallback_s=1.0, room=1)
    assert plan(full) == Plan()


# -- the zombie owner: members that cannot reach Kafka -----------------------------------


def test_members_that_cannot_reach_kafka_get_no_share_while_others_can() -> None:
    members = {
        "a": Member(),
        "b": Member(kafka_ok=False),
        "c": Member(),
    }
    shares = fair_shares(64, effective_members(members))
    assert shares == {"a": 32, "b": 0, "c": 32}
    # When nobody can reach Kafka, nothing moves on that account.
    everyone_down = {k: Member(kafka_ok=False) for k in "abc"}
    assert fair_shares(64, effective_members(everyone_down)) == fair_shares(64, everyone_down)


def test_the_health_flag_is_read_from_registrations_and_defaults_to_healthy() -> None:
    assert member_from_json(b'{"weight": 1, "kafka_ok": false}') == Member(kafka_ok=False)
    assert member_from_json(b'{"weight": 2}') == Member(weight=2.0)  # an older instance
    assert member_from_json(b'{"kafka_ok": "no"}').kafka_ok is True  # only false is false
