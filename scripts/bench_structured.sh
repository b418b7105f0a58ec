#!/usr/bin/env bash
# Structured-output overhead on the GPU: the same online load with 0% and 50% of the requests
# constrained (a regex that never completes, so ignore_eos keeps output lengths exact).
#   bash scripts/bench_structured.sh [OUT_DIR] [API_SERVER_COUNT] [VOCAB_SIZE]
# VOCAB_SIZE=1000 gives the model the demo tokenizer's vocabulary: with dummy weights the full
# 151,936-id head mostly samples ids the tokenizer lacks, which stream no text, while constrained
# requests always produce text; a matching vocabulary makes both do the same frontend work.
set -euo pipefail
out=${1:-.}
api_servers=${2:-1}
vocab=${3:-151936}
model=$(python3 -c "import sys; sys.path.insert(0, 'scripts'); \
from bench_throughput import make_preset; print(make_preset('qwen3-0.6b', vocab_size=$vocab))")
python3 -m frontend serve "$model" --load-format dummy --max-model-len 4096 --port 8123 \
  --api-server-count "$api_servers" > "$out/server.log" 2>&1 &
server=$!
trap 'kill $server; wait $server || true' EXIT
for _ in $(seq 1 240); do curl -sf http://127.0.0.1:8123/health > /dev/null && break; sleep 0.5; done
# Warm-up: the first run pays Triton compiles and CUDA-graph buckets; constrained requests also
# build llguidance's tokenizer once per process. Not measured.
python3 scripts/bench_serving.py --base-url http://127.0.0.1:8123 --num-prompts 128 \
  --max-concurrency 64 --input-len 512 --output-len 64 --structured-fraction 0.5 > /dev/null
i=0
for frac in 0 0.5 0 0.5; do  # alternating shows run-to-run noise
  i=$((i + 1))
  python3 scripts/bench_serving.py --base-url http://127.0.0.1:8123 --num-prompts 256 \
    --max-concurrency 64 --input-len 512 --output-len 256 --structured-fraction "$frac" \
    --result-file "$out/structured_a${api_servers}_v${vocab}_${i}_$frac.json" | grep -E "output token|TPOT|fraction" || true
done
