"""`HeadLink`: how an engine core on a headless node joins the head node (multi-node DP).

The head node's launcher listens on `tcp://<data_parallel_address>:<data_parallel_rpc_port>`
(a ZMQ ROUTER). A remote core talks to it over a DEALER, before it loads its model:

    core                                  head launcher
     | DPHello(rank, fingerprint)  ---->   checks the rank is remote, free, configs agree
     | <----  DPWelcome(num_clients)       (or DPWelcome(error=...): the core exits with it)
     | binds tcp://<its ip>:* for input and for each of the num_clients outputs
     | DPRegister(rank, addresses) ---->   records them; starts API servers once all registered
     | <----  DPWelcome()                  ack

The core's own address is the local interface that routes to the head, so the head's API
servers can reach it without another flag.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import zmq

from enginecore.protocol import DPHello, DPRegister, DPWelcome, dp_handshake_decoder, encode

_POLL_MS = 200


class HeadRefusedError(RuntimeError):
    """The head node refused this engine core (rank taken, config mismatch), or never answered."""


def local_host_towards(head_addr: str) -> str:
    """The IP of the local interface that routes to `head_addr` (tcp://host:port)."""
    parts = urlsplit(head_addr)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((parts.hostname or "127.0.0.1", parts.port or 9))  # UDP: nothing is sent
        return s.getsockname()[0]


class HeadLink:
    """The registration conversation of one engine core (one DP rank) with the head."""

    def __init__(self, head_addr: str, dp_rank: int, fingerprint: str):
        self.head_addr = head_addr
        self.dp_rank = dp_rank
        self.fingerprint = fingerprint
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(head_addr)

    def _ask(self, msg, timeout: float, should_abort: Callable[[], bool]) -> DPWelcome:
        self.sock.send(encode(msg))
        deadline = time.monotonic() + timeout
        while not self.sock.poll(_POLL_MS):
            if should_abort() or time.monotonic() > deadline:
                raise HeadRefusedError(f"no answer from the head node at {self.head_addr}")
        reply = dp_handshake_decoder.decode(self.sock.recv())
        if not isinstance(reply, DPWelcome):
            raise HeadRefusedError(f"unexpected handshake reply {type(reply).__name__}")
        if reply.error:
            raise HeadRefusedError(f"head node refused DP rank {self.dp_rank}: {reply.error}")
        return reply

    def hello(self, timeout: float, should_abort: Callable[[], bool]) -> int:
        """Introduce this rank; return how many API servers (clients) will connect."""
        welcome = self._ask(DPHello(dp_rank=self.dp_rank, fingerprint=self.fingerprint),
                            timeout, should_abort)
        return welcome.num_clients

    def register(self, input_addr: str, output_addrs: list[str], engine_pid: int,
                 timeout: float) -> None:
        """Tell the head where this core's sockets are bound."""
        self._ask(DPRegister(dp_rank=self.dp_rank, input_addr=input_addr,
                             output_addrs=output_addrs, engine_pid=engine_pid),
                  timeout, lambda: False)

    def close(self) -> None:
        self.sock.close()
