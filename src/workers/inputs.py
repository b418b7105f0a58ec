"""`InputBuffers`: persistent, fixed-capacity step inputs (host staging + device copies).

Every step writes its flat inputs into preallocated numpy views of pinned host memory and copies
the used prefix to persistent device tensors with non-blocking copies. Persistent device buffers
are what CUDA graphs need (a replay reads the addresses it was captured with), and pinned staging
keeps the host->device copies asynchronous.

Dimension legend: T tokens in the step (<= max_tokens), B requests in the step (<= max_reqs),
M block-table columns (<= max_blocks_per_req).
"""

from __future__ import annotations

import torch

from workers.attention import AttnMetadata


class InputBuffers:
    def __init__(self, max_tokens: int, max_reqs: int, max_blocks_per_req: int,
                 device: torch.device):
        self.device = device
        pin = device.type == "cuda"

        def pair(shape, dtype):
            host = torch.zeros(shape, dtype=dtype, pin_memory=pin)
            return host, host.numpy(), torch.zeros(shape, dtype=dtype, device=device)

        self.ids_host, self.input_ids, self.input_ids_dev = pair(max_tokens, torch.int64)
        self.pos_host, self.positions, self.positions_dev = pair(max_tokens, torch.int64)
        self.slot_host, self.slot_mapping, self.slot_mapping_dev = pair(max_tokens, torch.int64)
        self.qsl_host, self.query_start_loc, self.query_start_loc_dev = pair(max_reqs + 1,
                                                                             torch.int32)
        self.seq_host, self.seq_lens, self.seq_lens_dev = pair(max_reqs, torch.int32)
        self.bt_host, self.block_tables, self.block_tables_dev = pair(
            (max_reqs, max_blocks_per_req), torch.int32)

    def copy_to_device(self, num_tokens: int, num_reqs: int, num_cols: int,
                       pad_reqs: int | None = None, pad_tokens: int | None = None) -> None:
        """Copy the step's prefix of every buffer to the device (non-blocking from pinned).

        `pad_reqs` > num_reqs turns rows num_reqs..pad_reqs into empty padding rows and
        `pad_tokens` (default pad_reqs) > num_tokens pads the tokens (CUDA graph replays run a
        fixed shape): query length 0, context 0, no cache writes.
        """
        rows = num_reqs if pad_reqs is None else pad_reqs
        tokens = num_tokens
        if pad_reqs is not None:
            tokens = max(num_tokens, rows if pad_tokens is None else pad_tokens)
            self.query_start_loc[num_reqs + 1: rows + 1] = num_tokens
            self.seq_lens[num_reqs:rows] = 0
            self.slot_mapping[num_tokens:tokens] = -1
            self.input_ids[num_tokens:tokens] = 0
            self.positions[num_tokens:tokens] = 0
        nb = self.device.type == "cuda"
        self.input_ids_dev[:tokens].copy_(self.ids_host[:tokens], non_blocking=nb)
        self.positions_dev[:tokens].copy_(self.pos_host[:tokens], non_blocking=nb)
        self.slot_mapping_dev[:tokens].copy_(self.slot_host[:tokens], non_blocking=nb)
        self.query_start_loc_dev[: rows + 1].copy_(self.qsl_host[: rows + 1], non_blocking=nb)
        self.seq_lens_dev[:rows].copy_(self.seq_host[:rows], non_blocking=nb)
        self.block_tables_dev[:num_reqs, :num_cols].copy_(self.bt_host[:num_reqs, :num_cols],
                                                          non_blocking=nb)

    def metadata(self, num_tokens: int, num_reqs: int, num_cols: int, max_query_len: int,
                 max_seq_len: int) -> AttnMetadata:
        """Attention metadata viewing the device buffers (no copies)."""
        return AttnMetadata(
            query_start_loc=self.query_start_loc_dev[: num_reqs + 1],
            seq_lens=self.seq_lens_dev[:num_reqs],
            block_tables=self.block_tables_dev[:num_reqs, :num_cols],
            slot_mapping=self.slot_mapping_dev[:num_tokens],
            max_query_len=max_query_len,
            max_seq_len=max_seq_len,
        )
