#!/usr/bin/env python3
"""Side-by-side table of benches/side_by_side.sh: Flower deployment mode and
Sangsaeng, one row per (P, K), from the raw results both benchmarks wrote.

Flower's server memory is its SuperLink plus its ServerApp (two processes);
its client memory is the largest SuperNode + ClientApp + SuperExec. Sangsaeng's
are the coordinator process and the largest participant process."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FLOWER = ROOT / "target" / "flower-harness" / "results" / "raw"
OURS = ROOT / "target" / "federation-bench" / "results.jsonl"


def p_label(p: float) -> str:
    return f"{p:.0e}".replace("e+0", "e")


def flower_rows():
    out = {}
    for f in sorted(FLOWER.glob("deploy*_P*_K*.json")):
        d = json.loads(f.read_text())
        if d.get("mode") != "deployment":
            continue
        m = d.get("memory") or {}
        peak = lambda k: (m.get(k) or {}).get("max_peak_rss_mib")
        server = sum(x for x in (peak("superlink"), peak("serverapp")) if x)
        client = sum(x for x in (peak("supernode"), peak("clientapp"), peak("supernode-superexec")) if x)
        out[(d["num_params"], d["num_clients"])] = {
            "median": d.get("median_round_s"),
            "server": server or None,
            "client": client or None,
            "payload": d.get("payload_bytes_per_update"),
            "status": d.get("status") + (": " + d["error"] if d.get("error") else ""),
        }
    return out


def our_rows():
    out = {}
    if OURS.exists():
        for line in OURS.read_text().splitlines():
            d = json.loads(line)
            if d.get("encoding", "float32") != "float32":
                continue
            key = (int(d["params_asked"]), int(d["clients"]))
            out[key] = d  # the latest run of a point wins
    return out


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def main() -> None:
    fl, us = flower_rows(), our_rows()
    print("| P | K | Flower s/round | Sangsaeng s/round | speed-up | Flower server MiB (SuperLink+ServerApp) | Sangsaeng coordinator MiB | Flower client MiB | Sangsaeng participant MiB | Flower status | Sangsaeng status (max abs err) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for key in sorted(set(fl) | set(us)):
        f, o = fl.get(key, {}), us.get(key, {})
        fm, om = f.get("median"), o.get("median_round_secs")
        speed = f"{fm / om:.0f}x" if fm and om else "-"
        ckib = o.get("coordinator_peak_rss_kib")
        pkib = o.get("participant_peak_rss_kib")
        err = o.get("max_abs_error")
        print(
            f"| {p_label(key[0])} | {key[1]} | {fmt(fm, '.2f')} | {fmt(om, '.3f')} | {speed} | "
            f"{fmt(f.get('server'), ',.0f')} | {fmt(ckib and ckib / 1024, ',.0f')} | "
            f"{fmt(f.get('client'), ',.0f')} | {fmt(pkib and pkib / 1024, ',.0f')} | "
            f"{f.get('status', 'not run')} | {o.get('status', 'not run')} ({fmt(err, '.1e')}) |"
        )


if __name__ == "__main__":
    main()
