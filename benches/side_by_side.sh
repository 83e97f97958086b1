#!/usr/bin/env bash
# Sangsaeng and Flower on the same workload, same machine, interleaved point by
# point (Flower's deployment mode, then Sangsaeng, for each (P, K)), so both see
# the same machine state. Results: target/federation-bench/results.jsonl and
# target/flower-harness/results/raw/*.json; the table: benches/side_by_side.py.
#
#   bash benches/side_by_side.sh "1e6:8 1e7:8 1e7:32"
#
# FLOWER_HARNESS points at the Flower harness (default ../shared/peers/flower);
# it is copied under target/ (its runs write beside themselves) and gets its own
# virtualenv with the exact versions of its requirements.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
POINTS=${1:-"1e6:8 1e7:8 1e6:32 1e7:32 1e8:8"}
HARNESS_SRC=${FLOWER_HARNESS:-../shared/peers/flower}
HARNESS=target/flower-harness
if [ ! -x "$HARNESS/.venv/bin/python" ]; then
  mkdir -p "$HARNESS"
  cp -r "$HARNESS_SRC"/. "$HARNESS"/
  chmod -R u+w "$HARNESS"
  python3 -m venv "$HARNESS/.venv"
  "$HARNESS/.venv/bin/pip" install -q -r "$HARNESS/requirements.txt"
fi
cargo build --release --example federation_bench
BENCH=target/release/examples/federation_bench
# Before each run: the previous run's writes flushed and its processes gone, so
# neither framework starts while the other's teardown still loads the machine.
settle() { sync; sleep 5; }
for pt in $POINTS; do
  P=${pt%%:*}; K=${pt##*:}
  settle
  echo "=== Flower deployment P=$P K=$K"
  (cd "$HARNESS" && timeout 620 .venv/bin/python bench_deploy.py --params "$P" --clients "$K" --timeout 500 | tail -n 1) || echo "flower run ended with $?"
  settle
  echo "=== Sangsaeng P=$P K=$K"
  timeout 1200 "$BENCH" --params "$P" --clients "$K" --timeout 1100 || echo "sangsaeng run ended with $?"
done
python3 benches/side_by_side.py
