#!/usr/bin/env bash
# Data-parallel throughput on 2 GPUs: the same offline workload with DP=1 (one GPU) and DP=2 (two
# engine cores, one GPU each), back to back on the same machine. Results: /tmp/bench_dp{1,2}.json.
#
#     bash scripts/bench_dp.sh [extra bench_throughput.py flags, e.g. --preset llama-3.1-8b]
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
for dp in 1 2; do
    "$PY" scripts/bench_throughput.py --data-parallel-size "$dp" --out "/tmp/bench_dp$dp.json" "$@" \
        > /dev/null
done
"$PY" - <<'PYEOF'
import json
for dp in (1, 2):
    r = json.load(open(f"/tmp/bench_dp{dp}.json"))
    e = r["engine"]
    print(f"DP={dp}: " + ", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in e.items()))
PYEOF
