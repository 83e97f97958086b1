#!/usr/bin/env python3
"""Builds the Tennessee Eastman subset used by the Sangsaeng example.

Reads the Braatz/Russell/Chiang .dat files (as shipped in the PyPI package
bibmon 1.2.0, Apache-2.0) and writes two CSV files next to this script:

  train.csv  d00.dat (normal, label 0) + dNN.dat (fault NN, label NN)
  test.csv   d00_te.dat (label 0) + dNN_te.dat, whose first 160 rows are
             normal operation (label 0) and the rest fault NN (label NN)

for the classes 0, 1, 2, 4, 5, 6, 7, 11 and 14. Header:
xmeas_1..xmeas_41, xmv_1..xmv_11, fault. Values keep 6 significant digits
(the source has 5, so nothing is lost).

Usage:
  python3 make_subset.py [SOURCE_DIR] [--out OUT_DIR]

SOURCE_DIR defaults to ../../../../shared/data/tennessee-eastman relative to
this script. To fetch the source files again:

  d=$(mktemp -d) && pip download --no-deps -d "$d" bibmon==1.2.0
  unzip -o "$d"/bibmon-1.2.0-py3-none-any.whl 'bibmon/tennessee_eastman/*.dat' -d "$d/x"
  python3 make_subset.py "$d/x/bibmon/tennessee_eastman"

Plain Python on purpose: numpy is not needed for 13k rows and may be absent.
"""

import argparse
import csv
import math
import os
import sys

N_XMEAS = 41
N_XMV = 11
N_COLS = N_XMEAS + N_XMV
FAULTS = [1, 2, 4, 5, 6, 7, 11, 14]
# dNN.dat has the fault throughout; dNN_te.dat introduces it after 8 hours
# (sample 161 at one sample per 3 minutes), so its first 160 rows are normal.
TEST_NORMAL_PREFIX = 160
TRAIN_ROWS = 480
TEST_ROWS = 960
NORMAL_TRAIN_ROWS = 500

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_SOURCE = os.path.join(HERE, "..", "..", "..", "..", "shared", "data", "tennessee-eastman")


def read_matrix(path):
    """Whitespace-separated floats, one row per non-empty line."""
    rows = []
    with open(path, "r", encoding="ascii") as f:
        for lineno, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            try:
                row = [float(x) for x in fields]
            except ValueError as e:
                sys.exit(f"{path}, line {lineno}: {e}")
            if not all(math.isfinite(v) for v in row):
                sys.exit(f"{path}, line {lineno}: non-finite value")
            rows.append(row)
    return rows


def check_shape(path, rows, n_rows, n_cols):
    if len(rows) != n_rows or any(len(r) != n_cols for r in rows):
        widths = sorted({len(r) for r in rows})
        sys.exit(f"{path}: expected {n_rows} x {n_cols}, found {len(rows)} rows of widths {widths}")


def load(source, name, n_rows, transposed=False):
    path = os.path.join(source, name)
    rows = read_matrix(path)
    if transposed:
        # d00.dat alone is stored as 52 variables x 500 samples.
        check_shape(path, rows, N_COLS, n_rows)
        rows = [list(col) for col in zip(*rows)]
    check_shape(path, rows, n_rows, N_COLS)
    return rows


def fmt(v):
    return "%.6g" % v


def write(path, labelled_rows):
    header = [f"xmeas_{i}" for i in range(1, N_XMEAS + 1)]
    header += [f"xmv_{i}" for i in range(1, N_XMV + 1)]
    header.append("fault")
    with open(path, "w", newline="", encoding="ascii") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        for label, row in labelled_rows:
            w.writerow([fmt(v) for v in row] + [str(label)])
    print(f"wrote {path}: {len(labelled_rows)} rows")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", nargs="?", default=DEFAULT_SOURCE, help="directory holding d00.dat ... d21_te.dat")
    ap.add_argument("--out", default=HERE, help="where train.csv and test.csv are written (default: next to this script)")
    args = ap.parse_args()

    train = [(0, r) for r in load(args.source, "d00.dat", NORMAL_TRAIN_ROWS, transposed=True)]
    test = [(0, r) for r in load(args.source, "d00_te.dat", TEST_ROWS)]
    for fault in FAULTS:
        train += [(fault, r) for r in load(args.source, f"d{fault:02d}.dat", TRAIN_ROWS)]
        rows = load(args.source, f"d{fault:02d}_te.dat", TEST_ROWS)
        test += [(0 if i < TEST_NORMAL_PREFIX else fault, r) for i, r in enumerate(rows)]

    os.makedirs(args.out, exist_ok=True)
    write(os.path.join(args.out, "train.csv"), train)
    write(os.path.join(args.out, "test.csv"), test)


if __name__ == "__main__":
    main()
