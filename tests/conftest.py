"""Session-wide services for the test suite.

Integration tests (everything under tests/integration/, marked ``integration``)
share one real ZooKeeper and one Kafka-protocol broker per session. Set
LINECHAT_TEST_ZOOKEEPER / LINECHAT_TEST_KAFKA to use existing servers (any
ZooKeeper, any Kafka) instead of starting local ones. Each test gets its own
cluster name and topic/group prefixes, so tests never see each other's state.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.cluster import ClusterNames, new_cluster_names

from linechatd.localservices import LocalBroker, LocalZooKeeper

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
