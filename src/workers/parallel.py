"""`TPGroup`: this worker's place in the tensor-parallel group, and the group's collectives.

Every worker process is one rank. The executor picks a free TCP port and passes it on each
worker's command line; `init_tp_group` joins the torch.distributed group through it (NCCL when the
model runs on CUDA, gloo on CPU). With one rank nothing is initialized and every collective is the
identity, so single-GPU runs pay nothing and need no port.

Layers receive the group explicitly (through `DecoderArgs.tp`), never from a global: the only
process-wide state is torch.distributed's default group, which `TPGroup` wraps.

Dimension legend: N rows (tokens), X any trailing size, P ranks (`size`).
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

# Collective timeout. A rank that dies mid-collective leaves its peers blocked; the executor
# notices the death within a second and kills them, so this only bounds orphans.
_TIMEOUT = datetime.timedelta(minutes=10)


class TPGroup:
    """Rank and size of the tensor-parallel group plus its collectives (identity for size 1).

    `expert_parallel` (`--enable-expert-parallel`) tells MoE layers to use the same ranks as an
    expert-parallel group (whole experts per rank) instead of slicing every expert.
    """

    def __init__(self, rank: int = 0, size: int = 1, expert_parallel: bool = False) -> None:
        assert 0 <= rank < size, (rank, size)
        self.rank = rank
        self.size = size
        self.expert_parallel = expert_parallel

    def __repr__(self) -> str:
        return (f"TPGroup(rank={self.rank}, size={self.size}, "
                f"expert_parallel={self.expert_parallel})")

    @property
    def is_first(self) -> bool:
        """Rank 0: the one that samples and answers the engine core."""
        return self.rank == 0

    def shard(self, total: int, what: str) -> tuple[int, int]:
        """(start, length) of this rank's equal slice of `total`; `what` names it in errors."""
        if total % self.size:
            raise ValueError(f"{what} ({total}) is not divisible by tensor_parallel_size "
                             f"({self.size})")
        length = total // self.size
        return self.rank * length, length

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of x over the ranks, in place; x is returned."""
        if self.size > 1:
            dist.all_reduce(x)
        return x

    def gather(self, x: torch.Tensor) -> torch.Tensor | None:
        """[N, X] on every rank -> [N, P*X] (concatenated in rank order) on rank 0, None elsewhere.

        A gather, not an all-gather: only rank 0 samples, so only it needs full logits.
        """
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.is_first else None
        dist.gather(x, parts, dst=0)
        return torch.cat(parts, dim=-1) if parts is not None else None

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's x on every rank (in place; x must have the same shape and dtype everywhere)."""
        if self.size > 1:
            dist.broadcast(x, src=0)
        return x

    def min(self, value: int) -> int:
        """The smallest of every rank's `value`."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=_collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())


SINGLE = TPGroup()


def _collective_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo only CPU ones.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_tp_group(rank: int, size: int, init_method: str | None, device: torch.device,
                  expert_parallel: bool = False) -> TPGroup:
    """Join the torch.distributed group of `size` ranks (a no-op for one rank)."""
    if size == 1:
        return TPGroup(0, 1, expert_parallel)
    if init_method is None:
        raise ValueError(f"tensor_parallel_size={size} needs an init method (--dist-init)")
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict = {}
    if device.type == "cuda":
        kwargs["device_id"] = device  # eager NCCL init, bound to this rank's GPU
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size,
                            timeout=_TIMEOUT, **kwargs)
    group = TPGroup(rank, size, expert_parallel)
    # One tiny collective now: a rank that cannot reach the others fails here, at startup.
    group.min(0)
    return group


def destroy_tp_group() -> None:
    """Leave the torch.distributed group, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
