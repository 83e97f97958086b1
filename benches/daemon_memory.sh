#!/usr/bin/env bash
# Peak memory of the participant daemon as deployed: the coordinator binary and
# two `sangsaeng-participant run --once` processes over mutual TLS on loopback,
# a 2-round training of an MLP with two hidden layers of H units (H = 4096 by
# default: 16.8M parameters, 67 MB of float32), each participant under
# `/usr/bin/time -v` for its maximum resident set size.
#
#   cargo test --workspace --no-run          # builds both binaries in target/debug
#   bash benches/daemon_memory.sh            # H = 4096
#   bash benches/daemon_memory.sh 2048 path/to/sangsaeng-participant
#
# The binaries are the ones `cargo test --workspace` builds (dev profile:
# dependencies at opt-level 1, ndarray at 3). The data is a small synthetic
# line export (3 sensors, 300 and 120 rows), so the model, not the data,
# dominates the memory. Prints one line per participant and the model size.
set -euo pipefail
cd "$(dirname "$0")/.."
H=${1:-4096}
PARTICIPANT=${2:-target/debug/sangsaeng-participant}
COORDINATOR=target/debug/sangsaeng-coordinator
ROSTER=$(realpath participant/tests/data/roster.toml)
for b in "$PARTICIPANT" "$COORDINATOR"; do
  [ -x "$b" ] || { echo "$b missing: run 'cargo test --workspace --no-run' first" >&2; exit 1; }
done
command -v /usr/bin/time >/dev/null || { echo "/usr/bin/time missing (apt-get install time)" >&2; exit 1; }
PARTICIPANT=$(realpath "$PARTICIPANT")
COORDINATOR=$(realpath "$COORDINATOR")
d=$(mktemp -d)
trap 'rm -rf "$d"' EXIT
cd "$d"

cp "$ROSTER" roster.toml
cat > plan.toml <<TOML
[schema]
feature_columns = ["temp", "pressure", "vibration"]
label_column = "defect"
classes = ["ok", "defect"]
[model]
hidden_layers = [$H, $H]
[training]
rounds = 2
learning_rate = 0.05
min_participants = 2
round_deadline_secs = 600
seed = 1
TOML
# A separable toy export: defects run hot and vibrate.
python3 - <<'PY'
import random
for name, rows, seed in (("a.csv", 300, 1), ("b.csv", 120, 2)):
    rng = random.Random(seed)
    with open(name, "w") as f:
        f.write("timestamp,temp,pressure,vibration,defect\n")
        for i in range(rows):
            d = i % 3 == 0
            f.write("2026-11-27T00:%02d:00,%.3f,%.3f,%.3f,%s\n" % (
                i % 60, (80 if d else 60) + 10 * rng.random(), 1 + rng.random(),
                (2 if d else 0.5) + rng.random(), "defect" if d else "ok"))
PY
"$COORDINATOR" pki demo --roster roster.toml --out pki >/dev/null 2>&1

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$COORDINATOR" serve --listen "127.0.0.1:$port" --roster roster.toml --plan plan.toml \
  --output-dir runs --ca pki/ca.pem --cert pki/server.pem --key pki/server.key 2>coordinator.log &
coordinator=$!
site() {
  /usr/bin/time -v "$PARTICIPANT" run --once --coordinator "https://127.0.0.1:$port" \
    --label-column defect --data "$2" --ca pki/ca.pem --cert "pki/$1.pem" --key "pki/$1.key" \
    2>"$1.log"
}
site plant-a a.csv & a=$!
site supplier-b b.csv & b=$!
wait $a $b
kill -TERM $coordinator; wait $coordinator || true
params=$(python3 -c "h=$H; print(3*h + h + h*h + h + h*2 + 2)")
echo "model: hidden [$H, $H], $params parameters, $((params * 4 / 1048576)) MiB of float32"
for s in plant-a supplier-b; do
  kib=$(sed -n 's/.*Maximum resident set size (kbytes): //p' "$s.log")
  echo "$s: peak RSS $((kib / 1024)) MiB"
done
grep -c "round .*/2:" coordinator.log >/dev/null || { echo "the training did not complete" >&2; exit 1; }
