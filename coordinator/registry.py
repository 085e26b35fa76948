"""The registry of connected agents: one control session per agent identity."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import grpc

from core.clock import SYSTEM, Clock
from core.errors import Unavailable
from protos.clawback.v1 import agent_pb2, common_pb2

log = logging.getLogger(__name__)


@dataclass(eq=False)
class AgentSession:
    """One open Control stream. Commands for the agent go through `queue`;
    `close()` ends the stream (the servicer's writer sees the sentinel)."""

    name: str
    hostname: str
    version: str
    capabilities: frozenset[str]  # negotiated: both sides listed them
    sources: tuple[common_pb2.SourceSpec, ...]
    peer: str
    connected_ns: int
    last_heartbeat_ns: int
    queue: asyncio.Queue[agent_pb2.CoordinatorMessage | None] = field(default_factory=asyncio.Queue)
    close_code: grpc.StatusCode | None = None
    close_reason: str = ""
    closed: bool = False

    def source(self, name: str) -> common_pb2.SourceSpec | None:
        return next((s for s in self.sources if s.name == name), None)

    def close(self, code: grpc.StatusCode | None = None, reason: str = "") -> None:
        """End the stream; `code` (if any) is the status the agent receives. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self.close_code, self.close_reason = code, reason
        self.queue.put_nowait(None)


class Registry:
    """Connected agents by identity. Not thread-safe: use from the event loop only."""

    def __init__(self, clock: Clock = SYSTEM) -> None:
        self._clock = clock
        self._sessions: dict[str, AgentSession] = {}

    def register(self, session: AgentSession) -> AgentSession | None:
        """Make `session` the agent's current one; an older session is closed and returned."""
        old = self._sessions.get(session.name)
        self._sessions[session.name] = session
        if old is not None and old is not session:
            # design.md §Control stream: a newer stream for the same identity replaces an older one.
            old.close(
                grpc.StatusCode.ABORTED, f"agent {session.name} connected again from {session.peer}"
            )
            log.info(
                "agent %s reconnected from %s; closing its older stream", session.name, session.peer
            )
            return old
        return None

    def unregister(self, session: AgentSession) -> bool:
        """Forget `session` if it is still the current one; True if the agent is now disconnected."""
        if self._sessions.get(session.name) is session:
            del self._sessions[session.name]
            return True
        return False

    def get(self, name: str) -> AgentSession | None:
        return self._sessions.get(name)

    def require(self, name: str) -> AgentSession:
        session = self._sessions.get(name)
        if session is None or session.closed:
            raise Unavailable(f"agent {name} is not connected")
        return session

    def is_connected(self, name: str) -> bool:
        s = self._sessions.get(name)
        return s is not None and not s.closed

    def sessions(self) -> Iterable[AgentSession]:
        return list(self._sessions.values())

    def heartbeat(self, session: AgentSession) -> None:
        session.last_heartbeat_ns = self._clock.now_ns()

    def send(self, agent: str, command: agent_pb2.Command) -> None:
        """Queue a command for a connected agent; raises Unavailable if it is not connected."""
        self.require(agent).queue.put_nowait(agent_pb2.CoordinatorMessage(command=command))

    def disconnect(self, agent: str, code: grpc.StatusCode, reason: str) -> bool:
        """Close the agent's stream, if any (revocation, shutdown)."""
        session = self._sessions.get(agent)
        if session is None:
            return False
        session.close(code, reason)
        return True

    def close_all(self, code: grpc.StatusCode, reason: str) -> None:
        for session in list(self._sessions.values()):
            session.close(code, reason)
