#!/usr/bin/env bash
# Runs every fuzz target for SECS seconds each (default 600), one after the
# other, from a small seed corpus, and prints libFuzzer's closing line per target.
# Usage: fuzz/run.sh [SECS] [target...]
# Needs cargo-fuzz (`cargo install cargo-fuzz`). On a stable toolchain
# RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass its sanitizer flags.
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-600}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(protocol_messages update_upload fedavg_fold store_records csv_rows scoring_rows config_toml audit_log secagg_shares)
export RUSTC_BOOTSTRAP=1

seed() { mkdir -p "corpus/$1"; printf '%b' "$3" > "corpus/$1/$2"; }
seed csv_rows good 'a,b,c,fault\n1,2,3,0\n0.5,-1e3,7,ok\n'
seed scoring_rows labelled '\x02a,b,c,fault\n1,2,3,0\n0.5,-1e3,7,ok\n4,5,6,1\n'
seed scoring_rows features '\x40a,b,c\n1,2,3\n'
seed csv_rows quoted '"a","b","c","fault"\n"1","2","3","1"\n'
seed config_toml plan '\x00[schema]\nfeature_columns = ["a", "b"]\nlabel_column = "y"\nclasses = ["ok", "bad"]\n[model]\nhidden_layers = [8]\n[training]\nrounds = 2\nlearning_rate = 0.01\nmin_participants = 1\n'
seed config_toml roster '\x01[[organisation]]\nid = "hanbit"\nname = "Hanbit Motors"\ntier = "anchor"\nrole = "admin"\n'
seed protocol_messages empty '\x00'
seed fedavg_fold one '\x00\x00\x05\x00\x00\x00\x10\x00\x04\x00\x00\x00\x80\x3f\x00\x00\x00\xbf'
seed config_toml policy '\x02[rules]\nrequire_consent = true\nmin_contributors = 3\nmax_weight_share = 0.5\nmin_rounds = 10\nmin_macro_f1 = 0.6\nrequire_differential_privacy = false\nmax_epsilon = 8.0\n[disclosure]\ncontributors = "tier"\n[licence]\nid = "Apache-2.0"\nterms = "x"\n'
seed audit_log line '{"entry":{"seq":0,"time":"2026-11-28T00:00:00Z","kind":"round_completed","data":{"training":"t-1","round":1,"contributions":[{"org":"a","sha256":"00","weight":3}],"global_model_sha256":"11"},"prev":"0000000000000000000000000000000000000000000000000000000000000000"},"hash":"00","sig":"AA=="}\n'

cargo fuzz build -O
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  echo "== $t (${secs}s)"
  cargo fuzz run -O "$t" "corpus/$t" -- -max_total_time="$secs" -rss_limit_mb=2048 \
    -max_len=65536 -print_final_stats=1 2>&1 | tee "/tmp/fuzz-$t.log" |
    grep -E "^(Done|stat::number_of_executed_units|stat::peak_rss_mb|==.*ERROR|SUMMARY)" || true
  echo "   corpus: $(ls "corpus/$t" | wc -l) inputs; coverage: $(grep -oE 'cov: [0-9]+' "/tmp/fuzz-$t.log" | tail -1)"
done
