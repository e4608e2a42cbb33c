"""Resume: send a reconnecting device what it missed, from the partition's topic.

The replay window is bounded by records (``replay.max_records`` behind the log
end, and what Kafka still retains) and by age (``replay.max_age_s``). A scan
reads [start, end) with a consumer of its own, assigned at ``start`` without
joining any group, and sends the records addressed to the session's uid
directly to its socket, before the session's writer starts on live records.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import trio
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from .kafka import KafkaUnavailable, PartitionConsumer
from .protocol import RecordError, decode_record, encode_message

if TYPE_CHECKING:
    from .context import Context
    from .partitions import PartitionRuntime
    from .session import Session

log = logging.getLogger(__name__)

SCAN_BATCH = 500


async def replay_window(ctx: Context, consumer: PartitionConsumer, resume: int, high: int) -> bool:
    """True when every offset in (resume, high) can still be replayed."""
    start = resume + 1
    if start >= high:
        ctx.metrics.replays.labels("nothing_missed").inc()
        return True
    low, _high = await consumer.watermarks()
    if start < low or high - start > ctx.config.value.replay.max_records:
        ctx.metrics.replays.labels("out_of_window").inc()
        return False
    return True


async def replay(
    ctx: Context, runtime: PartitionRuntime, session: Session, start: int, end: int
) -> None:
    if start >= end:
        return
    cfg = ctx.config.value
    settings = {
        "bootstrap.servers": cfg.kafka.bootstrap_servers,
        # Required by librdkafka; never joined or committed to.
        "group.id": f"{ctx.group(runtime.partition)}-replay",
        "enable.auto.commit": False,
        "enable.partition.eof": True,
        "fetch.wait.max.ms": cfg.kafka.fetch_wait_max_ms,
        "socket.nagle.disable": True,
    }
    topic = ctx.topic(runtime.partition)
    oldest_ms = (time.time() - cfg.replay.max_age_s) * 1000
    consumer = Consumer(settings)
    consumer.assign([TopicPartition(topic, 0, start)])
    sent = 0
    limiter = ctx.consumer_limiter

    def next_batch() -> list[Message]:
        return consumer.consume(SCAN_BATCH, 0.5)

    try:
        position = start
        while position < end:
            messages = await trio.to_thread.run_sync(next_batch, limiter=limiter)
            for m in messages:
                err = m.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        position = end  # nothing more was written before ``end``
                        break
                    continue
                offset = m.offset()
                if offset is None:
                    continue
                if offset >= end:
                    position = end
                    break
                position = offset + 1
                try:
                    chat = decode_record(m.value())
                except RecordError:
                    continue
                if chat.to != session.uid or chat.ts < oldest_ms:
                    continue
                await session.send_replayed(offset, encode_message(chat, runtime.partition, offset))
                sent += 1
    except KafkaException as exc:
        raise KafkaUnavailable(f"replay of {topic}: {exc}") from exc
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(consumer.close, limiter=limiter)
        ctx.metrics.replays.labels("replayed").inc()
        ctx.metrics.replayed_records.inc(sent)
        log.info(
            "replay_done",
            extra={
                "partition": runtime.partition,
                "uid": session.uid,
                "records": sent,
                "from": start,
                "to": end,
            },
        )
