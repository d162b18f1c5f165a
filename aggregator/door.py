"""Who may hold the aggregator's handler threads, and for how long.

gRPC's synchronous server gives every call a worker thread from `server.workers`, and a call
whose client never sends its message holds that thread for as long as the client likes: forty
silent streams once held all 32 and every honest poll timed out. So every call passes this door:

- Callers that show a valid session in the call's metadata (`fedprompt-session`, sent by the
  edge client before any message; `fedprompt-token`, its enrolment token, for Enroll) are
  enrolled clients, at most `server.max_calls_per_client`
  calls each. Everyone else (strangers, and clients that only carry the session inside their
  message) shares `server.max_stranger_calls` places; a call beyond is refused at once with
  RESOURCE_EXHAUSTED, so strangers can never take the threads enrolled clients need.
- A call's first message must arrive within `server.first_message_timeout_s`, and every later
  message (an update's chunks) or the client's read of every reply chunk within
  `server.idle_timeout_s`; otherwise the call is cut (the client sees CANCELLED) with one log
  line.
- The total number of calls the server holds, running or queued, is `server.max_calls`
  (gRPC's `maximum_concurrent_rpcs`; beyond it gRPC answers RESOURCE_EXHAUSTED).

A call that authenticates from its message is counted against its client from then on
(`Call.bind`), so the per-client bound holds for every client.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import TypeVar

import grpc

from aggregator.config import ServerConfig
from aggregator.rounds import Refused
from aggregator.store import Store
from fedprompt.common.network import SESSION_METADATA, TOKEN_METADATA

log = logging.getLogger("fedprompt.aggregator")
T = TypeVar("T")


class Call:
    """One admitted call: its place (a client's or a stranger's) and its deadlines."""

    def __init__(self, door: Door, context: grpc.ServicerContext, what: str, client: str | None) -> None:
        self.door, self.context, self.what, self.client = door, context, what, client
        self.cut_reason: str | None = None
        self.replying = False  # the handler has returned; only its reply is being sent
        self.closed = False

    def requests(self, stream: Iterator[T]) -> Iterator[T]:
        """The call's request messages, each within its deadline (the first, then idle ones)."""
        timeout, which = self.door.config.first_message_timeout_s, "first message"
        while True:
            self.door.watch(self, timeout, f"no {which} within {timeout:g} s")
            try:
                message = next(stream, None)
            except grpc.RpcError:
                if self.cut_reason is None:
                    raise
                message = None
            finally:
                self.door.unwatch(self)
            if message is None:
                if self.cut_reason is not None:
                    raise Refused(grpc.StatusCode.DEADLINE_EXCEEDED, f"cut: {self.cut_reason}")
                return
            self.door.leave_strangers(self)  # the message says who sends it: the handler checks it now
            yield message
            timeout, which = self.door.config.idle_timeout_s, "next message"

    def responses(self, stream: Iterator[T]) -> Iterator[T]:
        """Reply messages; the client must take each within the idle deadline."""
        self.replying = True
        timeout = self.door.config.idle_timeout_s
        for message in stream:
            self.door.watch(self, timeout, f"reply not read within {timeout:g} s")
            yield message
            self.door.unwatch(self)

    def bind(self, client: str) -> None:
        """The call authenticated as `client` from its message: count it against that client."""
        if self.client is None:
            self.door.join_client(self, client)

    def close(self) -> None:
        self.door.release(self)


class Door:
    """Admission, per-client and stranger bounds, and the deadlines' watchdog thread."""

    def __init__(self, config: ServerConfig, store: Store) -> None:
        self.config = config
        self.store = store
        self._lock = threading.Condition()
        self._strangers: set[Call] = set()
        self._per_client: Counter[str] = Counter()
        self._deadlines: dict[Call, tuple[float, str]] = {}
        threading.Thread(target=self._watch, name="door-watchdog", daemon=True).start()

    # ---- admission ---------------------------------------------------------------------------

    def admit(self, context: grpc.ServicerContext, what: str) -> Call:
        """A place for this call, or Refused(RESOURCE_EXHAUSTED) at once."""
        client = self._caller(dict(context.invocation_metadata() or ()))
        call = Call(self, context, what, None)
        if client is not None:
            self.join_client(call, client)
        else:
            with self._lock:
                if len(self._strangers) >= self.config.max_stranger_calls:
                    raise Refused(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"{self.config.max_stranger_calls} calls without a session in their metadata "
                        "are already waiting; try again later",
                    )
                self._strangers.add(call)
        context.add_callback(call.close)
        return call

    def _caller(self, metadata: dict[str, str]) -> str | None:
        """The enrolled client whose session (or enrolment token, for Enroll) the metadata shows."""
        if metadata.get(SESSION_METADATA):
            return self.store.client_for_session(metadata[SESSION_METADATA])
        if metadata.get(TOKEN_METADATA):
            return self.store.client_for_token(metadata[TOKEN_METADATA])
        return None

    def join_client(self, call: Call, client: str) -> None:
        with self._lock:
            if self._per_client[client] >= self.config.max_calls_per_client:
                raise Refused(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{client} already has {self.config.max_calls_per_client} calls open "
                    "(server.max_calls_per_client)",
                )
            self._per_client[client] += 1
            call.client = client
            self._strangers.discard(call)

    def leave_strangers(self, call: Call) -> None:
        with self._lock:
            self._strangers.discard(call)

    def release(self, call: Call) -> None:
        with self._lock:
            if call.closed:
                return
            call.closed = True
            self._strangers.discard(call)
            self._deadlines.pop(call, None)
            if call.client is not None:
                self._per_client[call.client] -= 1
                if not self._per_client[call.client]:
                    del self._per_client[call.client]

    # ---- deadlines ---------------------------------------------------------------------------

    def watch(self, call: Call, timeout_s: float, reason: str) -> None:
        with self._lock:
            self._deadlines[call] = (time.monotonic() + timeout_s, reason)
            self._lock.notify_all()

    def unwatch(self, call: Call) -> None:
        with self._lock:
            self._deadlines.pop(call, None)

    def _watch(self) -> None:
        """Cuts calls past their deadline. A handler still running logs the cut as its refusal;
        a reply the client does not read is logged here."""
        while True:
            with self._lock:
                now = time.monotonic()
                expired = [call for call, (due, _) in self._deadlines.items() if due <= now]
                for call in expired:
                    call.cut_reason = self._deadlines.pop(call)[1]
                upcoming = min((due for due, _ in self._deadlines.values()), default=now + 1.0)
            for call in expired:
                if call.replying:
                    log.warning("%s reply to %s cut: %s", call.what, call.context.peer(), call.cut_reason)
                call.context.cancel()
            with self._lock:
                self._lock.wait(timeout=min(1.0, max(0.01, upcoming - time.monotonic())))
