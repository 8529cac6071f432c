"""PyTorch gloo all-reduce on this machine, reported like `worker bench allreduce`.

python3 collective/scripts/gloo_bench.py --ranks 2 --size-mb 1,4,16,64 --iterations 10
"""
import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def rank_main(rank, world, sizes, warmup, iterations, port, out):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rows = []
    for mb in sizes:
        n = int(mb * 1024 * 1024) // 4
        buf = torch.arange(n, dtype=torch.float32) * 0.01 + rank
        times = []
        for i in range(warmup + iterations):
            dist.barrier()
            t = time.perf_counter()
            dist.all_reduce(buf)
            buf /= world
            if i >= warmup:
                times.append(time.perf_counter() - t)
        median = statistics.median(times)
        algbw = n * 4 / median / 1e9
        rows.append((mb, median, algbw, algbw * 2 * (world - 1) / world))
    if rank == 0:
        out.extend(rows)
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--size-mb", default="1,4,16,64")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--port", type=int, default=29517)
    a = p.parse_args()
    sizes = [float(s) for s in a.size_mb.split(",")]
    with mp.Manager() as m:
        out = m.list()
        mp.spawn(rank_main, args=(a.ranks, sizes, a.warmup, a.iterations, a.port, out), nprocs=a.ranks)
        print(f"gloo all-reduce, {a.ranks} ranks")
        print(f"| {'size':>9} | {'median ms':>10} | {'algbw GB/s':>11} | {'busbw GB/s':>11} |")
        for mb, med, alg, bus in out:
            print(f"| {mb:>6.0f} MB | {med * 1e3:>10.2f} | {alg:>11.3f} | {bus:>11.3f} |")


if __name__ == "__main__":
    main()
