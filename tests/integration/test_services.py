"""The session's ZooKeeper and broker work: the ground every integration test stands on."""

from __future__ import annotations

import time

from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from kazoo.client import KazooClient
from support.cluster import ClusterNames


def test_zookeeper_accepts_a_session_and_writes(
    zookeeper_hosts: str, cluster_names: ClusterNames
) -> None:
    client = KazooClient(hosts=zookeeper_hosts, timeout=10.0)
    client.start(timeout=30)
    try:
        root = f"/linechat-test/{cluster_names.cluster}"
        client.create(f"{root}/probe", b"hello", makepath=True)
        client.create(f"{root}/ephemeral", b"", ephemeral=True)
        data, _ = client.get(f"{root}/probe")
        assert data == b"hello"
        assert sorted(client.get_children(root)) == ["ephemeral", "probe"]
        client.delete(root, recursive=True)
    finally:
        client.stop()
        client.close()


def test_broker_creates_a_topic_and_round_trips_a_record(
    kafka_bootstrap: str, cluster_names: ClusterNames
) -> None:
    topic = f"{cluster_names.topic_prefix}0"
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    futures = admin.create_topics(
        [NewTopic(topic, num_partitions=1, replication_factor=1)], operation_timeout=10
    )
    futures[topic].result(timeout=30)

    producer = Producer(
        {"bootstrap.servers": kafka_bootstrap, "acks": "all", "enable.idempotence": True}
    )
    reports: list[tuple[KafkaError | None, Message]] = []
    producer.produce(
        topic, key=b"alice", value=b"hello", on_delivery=lambda err, msg: reports.append((err, msg))
    )
    assert producer.flush(30) == 0, "the broker did not acknowledge the record in time"
    [(error, delivered)] = reports
    assert error is None, error
    offset = delivered.offset()
    assert offset is not None and offset >= 0

    consumer = Consumer(
        {
            "bootstrap.servers": kafka_bootstrap,
            "group.id": f"{cluster_names.group_prefix}0",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 10,
        }
    )
    try:
        consumer.assign([TopicPartition(topic, 0, offset)])
        deadline = time.monotonic() + 30
        record = None
        while record is None and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None:
                continue
            assert message.error() is None, message.error()
            record = message
        assert record is not None, "no record consumed within 30 s"
        assert (record.key(), record.value(), record.offset()) == (b"alice", b"hello", offset)
    finally:
        consumer.close()
