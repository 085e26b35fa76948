"""The agent's ChannelPool: a new channel after a certificate renewal, the old one closed when unused."""

from __future__ import annotations

from agent.client import ChannelPool


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
