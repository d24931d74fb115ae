"""Reads a benchmark's results.tsv (measure, repetition, value) and prints the medians."""
import statistics


def load(path):
    rows = {}
    for line in open(path):
        k, _, v = line.rstrip("\n").split("\t")
        rows.setdefault(k, []).append(float(v))
    return rows, {k: statistics.median(v) for k, v in rows.items()}


def table(rows, med, width=36):
    print(f"{'measure':<{width}} {'median':>10}   runs")
    for k, v in rows.items():
        print(f"{k:<{width}} {med[k]:>10.3f}   {' '.join(f'{x:.3f}' for x in v)}")
    print()
