#!/usr/bin/env python3
"""Fetch the CPU part of libtorch 2.9.0 for `cargo build -p worker --features libtorch`.

Burn 0.22's LibTorch backend (tch 0.22) is written against libtorch 2.9.0 exactly. PyTorch's
2.9.0 wheel for Linux x86_64 carries libtorch: this downloads it with pip (no install, no
dependencies), checks its SHA-256, and unpacks only the headers and the CPU libraries, about
480 MB instead of 4 GB with CUDA. libtorch_cpu.so of that wheel also needs the CUDA runtime and
CUPTI libraries to load (its profiler links them), so their two small wheels come too; nothing
runs on a GPU.

    python3 worker/scripts/fetch_libtorch.py [DIR]      # default ~/.cache/effnet-cluster/libtorch
    export LIBTORCH=DIR/2.9.0/torch                     # the script prints this line
    cargo build --release -p worker --features libtorch

Run it again at will: a finished directory is kept. Offline, pip fails and this says so.
"""

import pathlib
import platform
import shutil
import sys
import zipfile

import wheels as pypi

VERSION = "2.9.0"
WHEELS = {
    "torch-2.9.0-cp311-cp311-manylinux_2_28_x86_64.whl":
        "51de31219c97c51cf4bf2be94d622e3deb5dcc526c6dc00e97c17eaec0fc1d67",
    "nvidia_cuda_runtime_cu12-12.8.90-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl":
        "adade8dcbd0edf427b7204d480d6066d33902cab2a4707dcfc48a2d0fd44ab90",
    "nvidia_cuda_cupti_cu12-12.8.90-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl":
        "ea0cb07ebda26bb9b29ba82cda34849e73c166c18162d3913575b0c9db9a6182",
}
REQUIREMENTS = ["torch==2.9.0", "nvidia-cuda-runtime-cu12==12.8.90", "nvidia-cuda-cupti-cu12==12.8.90"]
# What the worker links and loads; CUDA builds of torch ship much more.
TORCH_LIBS = {"libc10.so", "libtorch.so", "libtorch_cpu.so", "libgomp.so.1", "libtorch_global_deps.so"}
RUNTIME_LIBS = {"libcudart.so.12", "libcupti.so.12"}


def fail(message):
    pypi.fail("fetch_libtorch", message)


def main():
    root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else pathlib.Path.home() / ".cache/effnet-cluster/libtorch")
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        fail(f"this fetches the Linux x86_64 wheel; on {platform.system()} {platform.machine()} "
             f"download libtorch {VERSION} for your platform from PyTorch's site and set LIBTORCH to it")
    target = root / VERSION
    libtorch = target / "torch"
    done = target / "complete"
    if done.is_file():
        print(f"export LIBTORCH={libtorch}")
        return
    wheels = root / "wheels"
    pypi.fetch("fetch_libtorch", wheels, WHEELS, REQUIREMENTS, ("--python-version", "3.11"))
    shutil.rmtree(target, ignore_errors=True)
    lib = libtorch / "lib"
    for name in WHEELS:
        with zipfile.ZipFile(wheels / name) as z:
            for member in z.namelist():
                base = member.rsplit("/", 1)[-1]
                if member.startswith("torch/include/"):
                    z.extract(member, target)
                elif member.startswith("torch/lib/") and base in TORCH_LIBS:
                    z.extract(member, target)
                elif base in RUNTIME_LIBS:
                    lib.mkdir(parents=True, exist_ok=True)
                    with z.open(member) as src, open(lib / base, "wb") as dst:
                        shutil.copyfileobj(src, dst)
    absent = sorted(n for n in TORCH_LIBS | RUNTIME_LIBS if not (lib / n).is_file())
    if absent:
        fail(f"the wheels lacked {', '.join(absent)}; {target} is incomplete")
    done.write_text(VERSION + "\n")
    print(f"export LIBTORCH={libtorch}")


if __name__ == "__main__":
    main()
