"""The agent's ChannelPool: a new channel after a certificate renewal, the old one closed when unused."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from agent.client import ChannelPool, open_channel, window_options
from coordinator.cli.certs import create_dev_pki


class FakeSource:
    """A CertSource whose renewals the test triggers."""

    def __init__(self) -> None:
        self.generation = 1

    def current(self) -> tuple[bytes, bytes, bytes]:
        n = str(self.generation).encode()
        return b"ca" + n, b"cert" + n, b"key" + n

    def close(self) -> None:
        pass


async def test_renewal_gives_new_leases_a_new_channel_and_keeps_old_ones() -> None:
    source = FakeSource()
    pool = ChannelPool("127.0.0.1:9", source)
    async with pool.lease() as control:  # the long-lived control stream
        async with pool.lease() as job1:
            assert job1 is control  # same certificate: one connection for everything
        source.generation = 2  # renewed
        async with pool.lease() as job2:
            assert job2 is not control
            assert pool.open_channels == 2  # the control stream keeps its channel
        async with pool.lease() as job3:
            assert job3 is job2
    assert pool.open_channels == 1  # the old channel closed with its last lease
    await pool.reset()  # the control stream broke: the next lease dials afresh
    assert pool.open_channels == 0
    async with pool.lease() as again:
        assert again is not job2
    await pool.close()
    assert pool.open_channels == 0


def test_window_options_fix_the_receive_window_or_leave_it_to_grpc() -> None:
    assert window_options(0) == []
    assert dict(window_options(4 << 20)) == {
        "grpc.http2.bdp_probe": 0,
        "grpc.http2.lookahead_bytes": 4 << 20,
    }


@pytest.mark.parametrize("window", [64 * 1024, 0])
async def test_a_fixed_window_still_streams_messages_larger_than_itself(
    tmp_path: Path, window: int
) -> None:
    """Over real mTLS on loopback: 12 messages of 1 MiB each through a 64 KiB window (and
    through gRPC's own), every byte intact and in order."""
    pki = create_dev_pki(tmp_path / "pki", agents=["node1"])
    ca, cert, key = pki["coordinator"].read()
    messages = [bytes([i]) * (1 << 20) for i in range(12)]

    async def send(request: bytes, context: object) -> AsyncIterator[bytes]:
        for m in messages:
            yield m

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "t.T",
                {
                    "Get": grpc.unary_stream_rpc_method_handler(
                        send, request_deserializer=bytes, response_serializer=bytes
                    )
                },
            ),
        )
    )
    creds = grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=True
    )
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    try:
        channel = open_channel(f"localhost:{port}", pki["agents"]["node1"], window)
        get = channel.unary_stream(
            "/t.T/Get", request_serializer=bytes, response_deserializer=bytes
        )
        got = [m async for m in get(b"")]
        await channel.close()
    finally:
        await server.stop(None)
    assert got == messages
