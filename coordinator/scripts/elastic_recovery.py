#!/usr/bin/env python3
"""Measure elastic recovery with the real binaries on this machine: detection time, recovery
time and steps redone per worker loss, time to admit a new worker (state transfer included),
and time for a restarted coordinator to get the run training again.

    cargo build --release -p coordinator -p worker
    python3 coordinator/scripts/elastic_recovery.py --bin target/release --trials 5

Prints a Markdown table. Every event is read from the processes' JSON logs (their own
timestamps), the kill time from this script's clock.
"""

import argparse
import datetime
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

TOKEN = "elastic-recovery-benchmark-token"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stamp(line):
    value = json.loads(line)
    t = datetime.datetime.fromisoformat(value["timestamp"].replace("Z", "+00:00"))
    return t.timestamp(), value["fields"]


def events(path, message):
    out = []
    with open(path) as f:
        for line in f:
            if f'"message":"{message}' in line:
                out.append(stamp(line))
    return out


def steps(port):
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return None
    for line in body.splitlines():
        if line.startswith("effnet_worker_steps_total "):
            return float(line.split()[1])
    return None


class Cluster:
    def __init__(self, bin_dir, work, workers, extra):
        self.bin = bin_dir
        self.work = work
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.token = os.path.join(work, "token")
        with open(self.token, "w") as f:
            f.write(TOKEN + "\n")
        self.args = [
            os.path.join(bin_dir, "coordinator"), "--log-format", "json", "start",
            "--listen", self.address, "--token-file", self.token, "--workers", str(workers),
            "--data", "synthetic", "--weights", "none", "--image-size", "64", "--batch-size", "4",
            "--head-epochs", "1", "--finetune-epochs", "2", "--limit-train", "240",
            "--limit-val", "20", "--limit-test", "20", "--checkpoint-every", "1",
            "--out", os.path.join(work, "run"),
        ] + extra
        self.coordinators = 0
        self.start_coordinator()
        self.workers = []

    def start_coordinator(self):
        self.coordinator_log = os.path.join(self.work, f"coordinator-{self.coordinators}.log")
        self.coordinators += 1
        self.coordinator = subprocess.Popen(self.args, stderr=open(self.coordinator_log, "w"))
        time.sleep(0.5)

    def start_worker(self):
        i = len(self.workers)
        metrics = free_port()
        log = os.path.join(self.work, f"worker-{i}.log")
        proc = subprocess.Popen(
            [os.path.join(self.bin, "worker"), "--log-format", "json", "join", "--coordinator",
             self.address, "--token-file", self.token, "--cpu", "--metrics-listen",
             f"127.0.0.1:{metrics}", "--coordinator-timeout", "120"],
            stderr=open(log, "w"))
        self.workers.append((proc, metrics, log))
        return self.workers[-1]

    def wait_steps(self, worker, at_least, timeout=600):
        deadline = time.time() + timeout
        while time.time() < deadline:
            s = steps(worker[1])
            if s is not None and s >= at_least:
                return
            time.sleep(0.01)
        raise SystemExit(f"worker made no progress (wanted {at_least} steps)")

    def finish(self):
        code = self.coordinator.wait(timeout=900)
        for proc, _, _ in self.workers:
            if proc.poll() is None:
                proc.wait(timeout=120)
        if code != 0:
            raise SystemExit(f"the run failed; see {self.coordinator_log}")


def worker_loss(bin_dir, seed):
    """Kill one of three workers mid-step; time detection and the new ring's first step."""
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as work:
        c = Cluster(bin_dir, work, 3, [])
        ws = [c.start_worker() for _ in range(3)]
        c.wait_steps(ws[0], 3 + rng.randrange(4))
        time.sleep(rng.random() * 0.3)
        victim = ws[1]
        killed = time.time()
        victim[0].send_signal(signal.SIGKILL)
        c.finish()
        broke = min(t for _, _, log in (ws[0], ws[2]) for t, _ in events(log, "the ring broke"))
        lost = events(c.coordinator_log, "worker lost")[0][0]
        reformed, fields = [e for e in events(c.coordinator_log, "the unit goes on")][0]
        completed = [f["completed_steps"] for log in (ws[0][2], ws[2][2]) for _, f in events(log, "the ring broke")]
        redone = max(completed) - fields["restart_step"] + 1
        return {
            "detect_ms": (broke - killed) * 1e3,
            "coordinator_ms": (lost - killed) * 1e3,
            "recover_ms": (reformed - killed) * 1e3,
            "redone": redone,
        }


def worker_join(bin_dir, seed):
    """Two workers, then a third: time from its start to training in the new ring."""
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as work:
        c = Cluster(bin_dir, work, 2, ["--max-workers", "3"])
        ws = [c.start_worker() for _ in range(2)]
        c.wait_steps(ws[0], 3 + rng.randrange(4))
        started = time.time()
        late = c.start_worker()
        c.finish()
        shared, fields = events(late[2], "training state shared")[0]
        return {
            "admit_ms": (shared - started) * 1e3,
            "transfer_ms": fields["seconds"] * 1e3,
            "state_mb": fields["bytes"] / 1e6,
        }


def coordinator_restart(bin_dir, seed):
    """Kill the coordinator after a checkpoint; time from the restart to the next epoch."""
    with tempfile.TemporaryDirectory() as work:
        c = Cluster(bin_dir, work, 2, [])
        ws = [c.start_worker() for _ in range(2)]
        deadline = time.time() + 600
        while not events(c.coordinator_log, "checkpoint committed"):
            if time.time() > deadline:
                raise SystemExit("no checkpoint committed")
            time.sleep(0.05)
        time.sleep(random.Random(seed).random())
        c.coordinator.send_signal(signal.SIGKILL)
        c.coordinator.wait()
        restarted = time.time()
        c.start_coordinator()
        c.finish()
        resumed = min(t for _, _, log in ws for t, _ in events(log, "resumed from checkpoint"))
        return {"resume_ms": (resumed - restarted) * 1e3}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bin", default="target/release", help="directory with coordinator and worker")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--events", default="loss,join,restart",
                        help="comma-separated subset of loss, join, restart")
    args = parser.parse_args()
    chosen = set(args.events.split(","))
    rows = []
    for key, name, fn in [("loss", "worker loss (3 -> 2)", worker_loss),
                          ("join", "worker join (2 -> 3)", worker_join),
                          ("restart", "coordinator restart", coordinator_restart)]:
        if key not in chosen:
            continue
        results = [fn(args.bin, seed) for seed in range(args.trials)]
        for key in results[0]:
            values = [r[key] for r in results]
            rows.append((name, key, statistics.median(values), min(values), max(values)))
        print(f"{name}: {args.trials} trials done", file=sys.stderr)
    print("| event | measure | median | min | max |")
    print("| --- | --- | ---: | ---: | ---: |")
    for name, key, med, lo, hi in rows:
        print(f"| {name} | {key} | {med:.1f} | {lo:.1f} | {hi:.1f} |")


if __name__ == "__main__":
    main()
