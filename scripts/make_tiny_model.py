"""Build a small random checkpoint with the demo tokenizer (thin CLI over `workers.demo`).

    python scripts/make_tiny_model.py --out /tmp/tiny-qwen3 [--arch llama] [--preset demo]
"""

from __future__ import annotations

from workers.demo import main

if __name__ == "__main__":
    main(default_preset="tiny")
