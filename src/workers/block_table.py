"""`BlockTable`: every live request's KV block ids in one persistent numpy table.

Each request owns a row for its lifetime (rows are recycled when requests finish). Blocks are
written once, when the scheduler hands them out, so a step's block tables and slot mapping come
from a couple of vectorized gathers instead of per-request Python work.

    table[row, i] = block id holding the request's tokens [i * block_size, (i + 1) * block_size)
"""

from __future__ import annotations

import numpy as np


class BlockTable:
    def __init__(self, max_reqs: int, max_blocks_per_req: int, block_size: int):
        self.block_size = block_size
        self.table = np.zeros((max_reqs, max_blocks_per_req), dtype=np.int32)
        self.num_blocks = np.zeros(max_reqs, dtype=np.int64)
        self.free_rows = list(range(max_reqs - 1, -1, -1))

    def add_row(self, block_ids: list[int]) -> int:
        """Claim a row for a new request holding `block_ids`."""
        if not self.free_rows:  # more live requests than expected: grow instead of failing
            old = self.table.shape[0]
            self.table = np.concatenate([self.table, np.zeros_like(self.table)])
            self.num_blocks = np.concatenate([self.num_blocks, np.zeros_like(self.num_blocks)])
            self.free_rows = list(range(2 * old - 1, old - 1, -1))
        row = self.free_rows.pop()
        self.num_blocks[row] = 0
        self.append(row, block_ids)
        return row

    def append(self, row: int, block_ids: list[int]) -> None:
        if block_ids:
            n = int(self.num_blocks[row])
            self.table[row, n: n + len(block_ids)] = block_ids
            self.num_blocks[row] = n + len(block_ids)

    def free_row(self, row: int) -> None:
        self.free_rows.append(row)

    def slots(self, rows: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Cache slot of each token: rows [T] (the token's request row), positions [T]."""
        bs = self.block_size
        return self.table[rows, positions // bs].astype(np.int64) * bs + positions % bs
