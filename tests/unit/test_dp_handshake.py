"""Data parallel without a model: the multi-node handshake (head registry <-> remote core link),
the DP flags and their validation, GPU slices per rank, and the client's load score. (The e2e
side is tests/e2e/test_data_parallel.py.)"""

from __future__ import annotations

import socket
import threading

import msgspec
import pytest
import zmq.asyncio

from enginecore.config import EngineConfig, ParallelConfig
from enginecore.head_link import HeadLink, HeadRefusedError, local_host_towards
from enginecore.protocol import EngineOutputs, SchedulerStats
from frontend import launch
from frontend.cli import parse_serve_args
from frontend.dp_registry import DPRegistry
from frontend.engine_link import EngineEndpoint, EngineLink, sum_stats


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def config(tiny_model_dir) -> EngineConfig:
    return EngineConfig.create(tiny_model_dir, data_parallel_size=3, data_parallel_size_local=1,
                               data_parallel_rpc_port=free_port())


def _join(config: EngineConfig, rank: int, fingerprint: str | None = None,
          outputs: int | None = None) -> int:
    """One remote core's whole handshake; returns the client count the head announced."""
    p = config.parallel
    link = HeadLink(f"tcp://{p.data_parallel_address}:{p.data_parallel_rpc_port}", rank,
                    fingerprint or config.dp_fingerprint())
    try:
        num_clients = link.hello(10.0, lambda: False)
        outs = [f"tcp://127.0.0.1:{7000 + rank * 10 + i}"
                for i in range(num_clients if outputs is None else outputs)]
        link.register(f"tcp://127.0.0.1:{7000 + rank}", outs, 1000 + rank, 10.0)
        return num_clients
    finally:
        link.close()


def test_registry_registers_remote_ranks_and_refuses_bad_ones(config):
    registry = DPRegistry(config, num_clients=2, remote_ranks=[1, 2])
    got: dict = {}
    waiter = threading.Thread(target=lambda: got.update(registry.wait(lambda: False)))
    waiter.start()
    try:
        with pytest.raises(HeadRefusedError, match="not a remote rank"):
            _join(config, 0)
        with pytest.raises(HeadRefusedError, match="configuration differs"):
            _join(config, 1, fingerprint="other-model")
        assert _join(config, 1) == 2
        with pytest.raises(HeadRefusedError, match="already registered"):
            _join(config, 1)
        assert _join(config, 2) == 2
        waiter.join(10)
        assert not waiter.is_alive()
    finally:
        registry.close()
    assert sorted(got) == [1, 2]
    assert got[2].input_addr == "tcp://127.0.0.1:7002"
    assert got[2].output_addrs == ["tcp://127.0.0.1:7020", "tcp://127.0.0.1:7021"]
    assert got[1].engine_pid == 1001


def test_registry_wait_stops_when_told(config):
    registry = DPRegistry(config, num_clients=1, remote_ranks=[1])
    try:
        assert registry.wait(lambda: True) is None
    finally:
        registry.close()


def test_head_link_gives_up_when_aborted(config):
    p = config.parallel
    link = HeadLink(f"tcp://127.0.0.1:{free_port()}", 1, config.dp_fingerprint())
    try:
        with pytest.raises(HeadRefusedError, match="no answer"):
            link.hello(30.0, lambda: True)
    finally:
        link.close()
    assert local_host_towards(f"tcp://127.0.0.1:{p.data_parallel_rpc_port}") == "127.0.0.1"


def test_dp_flags_reach_parallel_config(tiny_model_dir):
    model, kwargs, server = parse_serve_args([
        tiny_model_dir, "--data-parallel-size", "4", "-dpl", "2", "--data-parallel-start-rank",
        "2", "--data-parallel-address", "10.0.0.1", "--data-parallel-rpc-port", "1234",
        "--headless"])
    assert server.headless
    p = EngineConfig.create(model, **kwargs).parallel
    assert (p.data_parallel_size, p.local_dp_size, p.data_parallel_start_rank) == (4, 2, 2)
    assert (p.data_parallel_address, p.data_parallel_rpc_port) == ("10.0.0.1", 1234)


@pytest.mark.parametrize("fields, name", [
    ({"data_parallel_size": 0}, "data_parallel_size"),
    ({"data_parallel_size": 2, "data_parallel_start_rank": 2}, "data_parallel_start_rank"),
    ({"data_parallel_size": 2, "data_parallel_start_rank": 1, "data_parallel_size_local": 2},
     "data_parallel_size_local"),
    ({"data_parallel_rpc_port": 70000}, "data_parallel_rpc_port"),
])
def test_bad_dp_settings_name_the_field(fields, name):
    with pytest.raises(ValueError, match=name):
        ParallelConfig(**fields).validate_data_parallel()


def test_each_local_rank_gets_its_own_gpus(config, monkeypatch):
    two_by_two = msgspec.structs.replace(config, parallel=msgspec.structs.replace(
        config.parallel, data_parallel_size=2, data_parallel_size_local=2,
        tensor_parallel_size=2))
    monkeypatch.setattr(launch.Env, "CUDA_VISIBLE_DEVICES", None)
    assert [launch.device_slice(two_by_two, i) for i in range(2)] == ["0,1", "2,3"]
    monkeypatch.setattr(launch.Env, "CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert [launch.device_slice(two_by_two, i) for i in range(2)] == ["4,5", "6,7"]
    monkeypatch.setattr(launch.Env, "CUDA_VISIBLE_DEVICES", "4,5,6")
    with pytest.raises(ValueError, match="needs 4 GPUs"):
        launch.device_slice(two_by_two, 0)
    single = msgspec.structs.replace(config, parallel=ParallelConfig())
    assert launch.device_slice(single, 0) is None  # DP=1 leaves the environment alone


def test_load_score_counts_requests_in_transit():
    ctx = zmq.asyncio.Context()
    links = [EngineLink(ctx, EngineEndpoint(dp_rank=r, input_addr=f"inproc://in{r}",
                                            output_addr=f"inproc://out{r}")) for r in range(2)]
    try:
        links[0].stats = SchedulerStats(num_running=3, num_waiting=0)
        links[1].stats = SchedulerStats(num_running=0, num_waiting=1)
        assert [link.score() for link in links] == [3, 4]
        links[0].add_sent()  # one more waiting on rank 0 as far as this client knows
        assert links[0].score() == 7
        links[0].heard(EngineOutputs(stats=SchedulerStats(num_running=4)))  # stats now include it
        assert links[0].score() == 4 and links[0].last_heard is not None
        assert links[0].dead_reason() is None
    finally:
        for link in links:
            link.close()
        ctx.term()


def test_sum_stats_weights_kv_usage_by_blocks():
    total = sum_stats([SchedulerStats(num_running=1, kv_cache_usage=0.5, num_total_blocks=100,
                                      prefix_cache_hits=2),
                       SchedulerStats(num_running=2, kv_cache_usage=0.0, num_total_blocks=300,
                                      prefix_cache_hits=3)])
    assert (total.num_running, total.prefix_cache_hits, total.num_total_blocks) == (3, 5, 400)
    assert total.kv_cache_usage == pytest.approx(50 / 400)


def test_handshake_messages_round_trip():
    from enginecore.protocol import (
        DPHello,
        DPRegister,
        DPWelcome,
        dp_handshake_decoder,
        encode,
    )

    for msg in (DPHello(dp_rank=3, fingerprint="f"), DPWelcome(num_clients=2),
                DPWelcome(error="no"), DPRegister(dp_rank=1, input_addr="tcp://h:1",
                                                  output_addrs=["tcp://h:2"], engine_pid=7)):
        assert dp_handshake_decoder.decode(encode(msg)) == msg
