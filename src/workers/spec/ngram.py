"""`NgramProposer`: prompt-lookup drafts. No model: the tokens that followed the latest earlier
occurrence of the request's last n tokens (prompt + output) are proposed as its next tokens.

Longer n-grams are tried first (prompt_lookup_max down to prompt_lookup_min); the most recent
match wins, since recent context predicts best in repetitive text (code edits, quoting).
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


class NgramProposer:
    def __init__(self, k: int, min_n: int, max_n: int) -> None:
        self.k, self.min_n, self.max_n = k, min_n, max_n

    def propose_one(self, tokens: np.ndarray, k: int | None = None) -> list[int]:
        """Up to k draft tokens continuing `tokens` [L] int64 (empty when no n-gram recurs)."""
        k = self.k if k is None else k
        length = len(tokens)
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            # Windows starting at 0..L-n-1: every earlier n-gram with at least one token after.
            windows = sliding_window_view(tokens[: length - 1], n)
            hits = np.flatnonzero((windows == tokens[length - n:]).all(axis=1))
            if len(hits):
                start = int(hits[-1]) + n
                return tokens[start: start + k].tolist()
        return []
