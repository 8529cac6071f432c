"""`worker bench allreduce --local N` and PyTorch's gloo, alternating, several times each.

Run-to-run noise on a small shared machine is 10-20%, so one run of each says little; this
runs both in turn `--reps` times per ring size and prints each one's median busbw, the
runs, and the ratio.

python3 collective/scripts/allreduce_vs_gloo.py --worker target/release/worker \
    --python /path/to/python-with-torch --ranks 2,3,4 --size-mb 1,4,16,64 --reps 5
"""
import argparse
import os
import re
import statistics
import subprocess
import sys

ROW = re.compile(r"\|\s+(\d+) MB\s*\|.*\|\s*([\d.]+)\s*\|\s*$")


def busbw(cmd):
    """{size in MB: busbw} from the table a run prints."""
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr}")
    rows = {}
    for line in out.stdout.splitlines():
        m = ROW.match(line)
        if m:
            rows[int(m.group(1))] = float(m.group(2))
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--worker", default="target/release/worker")
    p.add_argument("--python", default=sys.executable, help="a python with torch installed")
    p.add_argument("--ranks", default="2,3,4")
    p.add_argument("--size-mb", default="1,4,16,64")
    p.add_argument("--iterations", default="10")
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args()
    gloo = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gloo_bench.py")
    runs = {}
    for _ in range(a.reps):
        for n in a.ranks.split(","):
            ours = [a.worker, "bench", "allreduce", "--local", n, "--size-mb", a.size_mb,
                    "--iterations", a.iterations]
            theirs = [a.python, gloo, "--ranks", n, "--size-mb", a.size_mb,
                      "--iterations", a.iterations]
            for name, cmd in (("effnet-cluster", ours), ("gloo", theirs)):
                for mb, bw in busbw(cmd).items():
                    runs.setdefault((int(n), mb), {}).setdefault(name, []).append(bw)
    print(f"busbw GB/s, median of {a.reps} alternating runs")
    print("| ranks | size | effnet-cluster | gloo | ratio | effnet-cluster runs | gloo runs |")
    print("| ---: | ---: | ---: | ---: | ---: | --- | --- |")
    for (n, mb), by in sorted(runs.items()):
        ours, theirs = by.get("effnet-cluster", []), by.get("gloo", [])
        if not ours or not theirs:
            continue
        mo, mt = statistics.median(ours), statistics.median(theirs)
        fmt = lambda v: " ".join(f"{x:.2f}" for x in v)
        print(f"| {n} | {mb} MB | {mo:.2f} | {mt:.2f} | {mo / mt:.2f} | {fmt(ours)} | {fmt(theirs)} |")


if __name__ == "__main__":
    main()
