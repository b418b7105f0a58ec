"""`DPRegistry`: the head node's registration port for engine cores on other nodes.

The head launcher binds a ZMQ ROUTER at `tcp://<data_parallel_address>:<data_parallel_rpc_port>`
and answers the handshake of `enginecore/head_link.py` (DPHello -> DPWelcome, DPRegister -> ack)
until every DP rank it does not run itself has registered. A rank that is not remote, already
registered, or whose configuration fingerprint differs from the head's is refused with a reason
(the remote core logs it and exits).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import zmq

from enginecore.config import EngineConfig
from enginecore.protocol import DPHello, DPRegister, DPWelcome, dp_handshake_decoder, encode

logger = logging.getLogger("frontend")

_POLL_MS = 100
_LOG_EVERY_S = 10.0


class DPRegistry:
    def __init__(self, config: EngineConfig, num_clients: int, remote_ranks: list[int]):
        p = config.parallel
        self.config = config
        self.num_clients = num_clients
        self.remote_ranks = set(remote_ranks)
        self.address = f"tcp://{p.data_parallel_address}:{p.data_parallel_rpc_port}"
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 1000)  # the last ack must reach its core
        self.sock.bind(self.address)
        self.greeted: dict[bytes, int] = {}  # DEALER identity -> rank it said hello for
        self.registered: dict[int, DPRegister] = {}

    def wait(self, should_stop: Callable[[], bool]) -> dict[int, DPRegister] | None:
        """Answer handshakes until every remote rank registered (None if told to stop)."""
        last_log = time.monotonic()
        while len(self.registered) < len(self.remote_ranks):
            if should_stop():
                return None
            if time.monotonic() - last_log > _LOG_EVERY_S:
                last_log = time.monotonic()
                logger.info("waiting for DP ranks %s to register at %s",
                            sorted(self.remote_ranks - set(self.registered)), self.address)
            if self.sock.poll(_POLL_MS):
                identity, raw = self.sock.recv_multipart()
                self.sock.send_multipart([identity, encode(self._answer(identity, raw))])
        return dict(self.registered)

    def _answer(self, identity: bytes, raw: bytes) -> DPWelcome:
        try:
            msg = dp_handshake_decoder.decode(raw)
        except Exception as e:  # a stray connection must not stop the head
            return DPWelcome(error=f"undecodable handshake message: {e}")
        match msg:
            case DPHello(dp_rank=rank, fingerprint=fingerprint):
                if rank not in self.remote_ranks:
                    return DPWelcome(error=f"rank {rank} is not a remote rank of this "
                                           f"deployment (remote: {sorted(self.remote_ranks)})")
                if rank in self.registered or rank in self.greeted.values():
                    return DPWelcome(error=f"rank {rank} is already registered")
                mine = self.config.dp_fingerprint()
                if fingerprint != mine:
                    return DPWelcome(error=f"configuration differs from the head's: {fingerprint}"
                                           f" != {mine}")
                self.greeted[identity] = rank
                return DPWelcome(num_clients=self.num_clients)
            case DPRegister(dp_rank=rank):
                if self.greeted.get(identity) != rank:
                    return DPWelcome(error=f"rank {rank} registered without a hello")
                self.registered[rank] = msg
                logger.info("DP rank %d registered: input %s (pid %d)", rank, msg.input_addr,
                            msg.engine_pid)
                return DPWelcome()
        return DPWelcome(error=f"unexpected handshake message {type(msg).__name__}")

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()
