#!/usr/bin/env bash
# Throughput and peak memory of `sangsaeng-participant predict` on a CSV of
# about 1 GB (release build): the supply-chain example's federated model
# scoring its firms' line data, the rows repeated to size, label column kept
# (so accuracy and macro-F1 are printed too).
# Usage: benches/predict_throughput.sh [GB]   (figures: docs/BENCHMARKS.md)
set -euo pipefail
cd "$(dirname "$0")/.."
gb=${1:-1}
work=target/predict-bench
cargo build --release -p sangsaeng-participant && cargo build --release --example supply_chain
rm -rf "$work" && mkdir -p "$work"
./target/release/examples/supply_chain --dp-epsilon 0 --personalise-epochs 0 \
  --work "$work/fed" > "$work/example.log" 2>&1
model=$(ls -d "$work"/fed/runs/t-*/ | head -1)
src="$work/fed/sites/hanbit-motors/line-data.csv"
# Double the rows until the file passes the size asked for.
head -n 1 "$src" > "$work/header.csv"
tail -n +2 "$src" > "$work/rows.csv"
limit=$(python3 -c "print(int($gb * 1e9))")
while [ "$(stat -c %s "$work/rows.csv")" -lt "$limit" ]; do
  cat "$work/rows.csv" "$work/rows.csv" > "$work/rows2.csv" && mv "$work/rows2.csv" "$work/rows.csv"
done
cat "$work/header.csv" "$work/rows.csv" > "$work/big.csv" && rm "$work/rows.csv"
echo "input: $(stat -c %s "$work/big.csv") bytes, $(($(wc -l < "$work/big.csv") - 1)) rows; model: $model"
/usr/bin/time -v ./target/release/sangsaeng-participant predict --model "$model" \
  --input "$work/big.csv" --out "$work/scored.csv" 2> "$work/time.log"
grep -E "Maximum resident set size|Elapsed \(wall clock\)" "$work/time.log"
echo "output: $(stat -c %s "$work/scored.csv") bytes"
rm -f "$work/big.csv" "$work/scored.csv"
