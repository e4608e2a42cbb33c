"""Session-wide services for the test suite.

Integration tests (everything under tests/integration/, marked ``integration``)
share one real ZooKeeper and one Kafka-protocol broker per session. Set
LINECHAT_TEST_ZOOKEEPER / LINECHAT_TEST_KAFKA to use existing servers (any
ZooKeeper, any Kafka) instead of starting local ones. Each test gets its own
cluster name and topic/group prefixes, so tests never see each other's state.

Fault tests ask for more (see tests/README.md): ``zookeeper_ensemble`` (three
servers, started only when a test asks; LINECHAT_TEST_ZOOKEEPER_ENSEMBLE uses an
existing one), ``zookeeper_ensemble_control`` (stop/kill/start its servers, all
back up after the test) and ``faulty_broker`` (a broker of the test's own whose
every connection goes through a FaultProxy).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio
from support.brokerproxy import FaultyBroker, start_faulty_broker
from support.cluster import ClusterNames, new_cluster_names
from support.ensemble import ENSEMBLE_ENV, EnsembleControl, ZooKeeperEnsemble

from linechatd.localservices import LocalBroker, LocalZooKeeper, LocalZooKeeperEnsemble

ZOOKEEPER_ENV = "LINECHAT_TEST_ZOOKEEPER"
KAFKA_ENV = "LINECHAT_TEST_KAFKA"

# The JVM's first start on a cold, small CI machine can be slow.
SERVICE_START_TIMEOUT_S = 90.0


INTEGRATION_DIR = Path(__file__).resolve().parent / "integration"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.resolve().is_relative_to(INTEGRATION_DIR):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def zookeeper_hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``host:port`` of a ZooKeeper shared by the whole session."""
    configured = os.environ.get(ZOOKEEPER_ENV)
    if configured:
        yield configured
        return
    zookeeper = LocalZooKeeper(tmp_path_factory.mktemp("zookeeper"))
    zookeeper.start(timeout=SERVICE_START_TIMEOUT_S)
    try:
        yield zookeeper.address
    finally:
        zookeeper.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap ``host:port`` of a Kafka-protocol broker shared by the whole session."""
    configured = os.environ.get(KAFKA_ENV)
    if configured:
        yield configured
        return
    broker = LocalBroker(tmp_path_factory.mktemp("broker"))
    broker.start(timeout=SERVICE_START_TIMEOUT_S)
    try:
        yield broker.address
    finally:
        broker.stop()


@pytest.fixture
def cluster_names() -> ClusterNames:
    """A cluster name and Kafka topic/group prefixes no other test uses."""
    return new_cluster_names()


@pytest.fixture(scope="session")
def zookeeper_ensemble(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ZooKeeperEnsemble]:
    """A three-server ZooKeeper ensemble shared by the session (started on first use)."""
    configured = os.environ.get(ENSEMBLE_ENV)
    if configured:
        yield ZooKeeperEnsemble(hosts=configured, local=None)
        return
    ensemble = LocalZooKeeperEnsemble(tmp_path_factory.mktemp("zookeeper-ensemble"), size=3)
    ensemble.start(timeout=SERVICE_START_TIMEOUT_S)
    try:
        yield ZooKeeperEnsemble(hosts=ensemble.hosts, local=ensemble)
    finally:
        ensemble.stop()


@pytest.fixture
def zookeeper_ensemble_control(zookeeper_ensemble: ZooKeeperEnsemble) -> Iterator[EnsembleControl]:
    """Stop/kill/start the ensemble's servers; every server serves again after the test.

    Skips when the ensemble comes from LINECHAT_TEST_ZOOKEEPER_ENSEMBLE.
    """
    control = zookeeper_ensemble.control()
    local = control.local
    local.start(timeout=SERVICE_START_TIMEOUT_S)  # in case an earlier restore failed
    yield control
    local.start(timeout=SERVICE_START_TIMEOUT_S)


@pytest.fixture
def local_broker_allowed() -> None:
    """Skips when LINECHAT_TEST_KAFKA is set (a sync fixture: the reason then shows)."""
    if os.environ.get(KAFKA_ENV):
        pytest.skip(
            f"{KAFKA_ENV} names an existing broker; fault tests need a broker whose "
            "advertised address is the fault proxy's, which only a local broker allows"
        )


@pytest.fixture
async def faulty_broker(
    local_broker_allowed: None, nursery: trio.Nursery, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[FaultyBroker]:
    """A fresh broker of this test's own, reachable only through a FaultProxy.

    ``.bootstrap`` is what clients get as ``bootstrap.servers``; ``.proxy`` cuts,
    blackholes or delays everyone or one process (``pid=``). Skips when
    LINECHAT_TEST_KAFKA is set: that broker's advertised address is not ours to set.
    """
    async with start_faulty_broker(
        nursery, tmp_path_factory.mktemp("faulty-broker"), timeout=SERVICE_START_TIMEOUT_S
    ) as broker:
        yield broker
