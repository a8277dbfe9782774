"""Where a JetStream message sits in its stream, read cheaply."""

from __future__ import annotations

from nats.aio.msg import Msg


def position(msg: Msg) -> tuple[int, int]:
    """(stream sequence, stored time in epoch ms) of a JetStream message, from its reply
    subject (`$JS.ACK.[domain.account.]stream.consumer.delivered.sseq.cseq.ts.pending...`),
    without building nats-py's metadata object."""
    tokens = (msg.reply or "").split(".")
    if len(tokens) == 9:
        return int(tokens[5]), int(tokens[7]) // 1_000_000
    if len(tokens) >= 11:
        return int(tokens[7]), int(tokens[9]) // 1_000_000
    meta = msg.metadata
    return meta.sequence.stream, int(meta.timestamp.timestamp() * 1000)
