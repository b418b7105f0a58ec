"""The worker's persistent block table: rows, appends, recycling, slot gathers."""

from __future__ import annotations

import numpy as np

from workers.block_table import BlockTable


def test_slots_follow_each_rows_blocks():
    bt = BlockTable(max_reqs=2, max_blocks_per_req=4, block_size=4)
    a = bt.add_row([7, 3])
    b = bt.add_row([5])
    bt.append(b, [9])
    rows = np.array([a, a, a, b, b], dtype=np.int64)
    pos = np.array([0, 5, 7, 3, 4], dtype=np.int64)
    # a: positions 0..3 in block 7, 4..7 in block 3; b: 0..3 in block 5, 4..7 in block 9.
    assert bt.slots(rows, pos).tolist() == [28, 13, 15, 23, 36]


def test_rows_are_recycled_and_the_table_grows_past_capacity():
    bt = BlockTable(max_reqs=2, max_blocks_per_req=2, block_size=4)
    a, b = bt.add_row([1]), bt.add_row([2])
    c = bt.add_row([3, 4])  # a third live request: the table doubles instead of failing
    assert len({a, b, c}) == 3 and bt.table.shape[0] == 4
    bt.free_row(a)
    d = bt.add_row([6])
    assert d == a and bt.num_blocks[d] == 1 and bt.table[d, 0] == 6
    assert bt.table[c].tolist() == [3, 4] and bt.table[b, 0] == 2
