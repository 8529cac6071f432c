#!/usr/bin/env python3
"""Place LLVM 23 where Burn's CUDA build looks for it, from PyPI, for `--features cuda`.

Burn 0.22's CUDA runtime (cubecl-cuda 0.11) compiles its kernels to PTX through LLVM's NVPTX
backend, linked statically. Its build script (tracel-llvm-bundler 23.1.0-4) downloads an LLVM
bundle from outside the package registries unless the directory

    $XDG_DATA_HOME/tracel/tracel-llvm-23.1.0-4      (XDG_DATA_HOME defaults to ~/.local/share)

already holds one, marked by the file `.tracel-llvm-installed`; cubecl-llvm then asks that
directory's `bin/llvm-config` how to link. The same LLVM (23.1.x, static, relocatable) is on
PyPI as two wheels: `mlc-llvm-static` (the X86 target, headers, a Python `llvm-config`) and
`mlc-llvm-static-extra-targets` (NVPTX and the other backends). This downloads both with pip
(no install, no dependencies), checks their SHA-256s, unpacks them into that directory and
writes the marker.

    python3 worker/scripts/fetch_llvm.py            # prints the environment to set
    eval "$(python3 worker/scripts/fetch_llvm.py)"
    cargo build --release -p worker --features cuda

Run it again at will: a finished directory is kept. Offline, pip fails and this says so.
The build needs python3 (llvm-config is a Python script) and the system's zlib and zstd
libraries (`libz.so`, `libzstd.so`: Debian's zlib1g-dev and libzstd-dev).
"""

import os
import pathlib
import platform
import shutil
import subprocess
import sys
import zipfile

import wheels as pypi

BUNDLE = "tracel-llvm-23.1.0-4"
SENTINEL = ".tracel-llvm-installed"
WHEELS = {
    "mlc_llvm_static-23.1.1.post0-py3-none-manylinux_2_28_x86_64.whl":
        "dcfec888abfaa418be77d41af585805f31463584cf9c90582992c00f392c1ac5",
    "mlc_llvm_static_extra_targets-23.1.1.post0-py3-none-manylinux_2_28_x86_64.whl":
        "c36e834d9a4e9cf9759f27fece65711ece7a2fc2b5a96dbb15d66f5e9e787929",
}
REQUIREMENTS = ["mlc-llvm-static==23.1.1.post0", "mlc-llvm-static-extra-targets==23.1.1.post0"]
# Inside both wheels the SDK is this folder; it becomes the bundle directory itself.
SDK = "mlc_llvm_static/static/"
# cudarc picks its CUDA API version from nvcc at build time, else the newest it knows; the
# LLVM backend's PTX was checked against CUDA 13.0's ptxas, so pin that when no nvcc is there.
CUDA_VERSION = "13000"


def fail(message):
    pypi.fail("fetch_llvm", message)


def data_home():
    """Where the `dirs` crate's data_local_dir() points on Linux (what the bundler uses)."""
    xdg = os.environ.get("XDG_DATA_HOME", "")
    if xdg and os.path.isabs(xdg):
        return pathlib.Path(xdg)
    return pathlib.Path.home() / ".local/share"


def environment(prefix):
    lines = [f"# LLVM for Burn's CUDA build: {prefix}"]
    if shutil.which("nvcc") is None:
        lines.append(f"export CUDARC_CUDA_VERSION={CUDA_VERSION}")
    return "\n".join(lines)


def unpack(wheels, prefix):
    staging = prefix.with_name(prefix.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    for name in WHEELS:
        with zipfile.ZipFile(wheels / name) as z:
            for info in z.infolist():
                if not info.filename.startswith(SDK) or info.is_dir():
                    continue
                dest = staging / info.filename[len(SDK):]
                dest.parent.mkdir(parents=True, exist_ok=True)
                with z.open(info) as src, open(dest, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                # Wheels keep Unix modes in the upper bits; llvm-config must stay executable.
                mode = (info.external_attr >> 16) & 0o777
                if mode:
                    dest.chmod(mode)
    config = staging / "bin/llvm-config"
    if not config.is_file():
        fail(f"the wheels lacked bin/llvm-config; {staging} is incomplete")
    config.chmod(0o755)
    if not any(staging.glob("lib/libLLVMNVPTXCodeGen.a")):
        fail(f"the wheels lacked the NVPTX backend (libLLVMNVPTXCodeGen.a); {staging} is incomplete")
    shutil.rmtree(prefix, ignore_errors=True)
    staging.rename(prefix)


def check(prefix):
    """Ask the unpacked llvm-config what cubecl-llvm will ask, so a broken SDK fails here."""
    config = prefix / "bin/llvm-config"
    result = subprocess.run([str(config), "--link-static", "--version"], capture_output=True, text=True)
    if result.returncode != 0 or not result.stdout.startswith("23."):
        fail(f"{config} --version gave {result.stdout.strip()!r} (exit {result.returncode}): "
             f"{result.stderr.strip()}; expected 23.x")
    targets = subprocess.run([str(config), "--targets-built"], capture_output=True, text=True)
    if "NVPTX" not in targets.stdout.split():
        fail(f"{config} does not list NVPTX among its targets ({targets.stdout.strip()})")


def main():
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        fail(f"these wheels are for Linux x86_64; on {platform.system()} {platform.machine()} "
             "let the CUDA build download its own LLVM bundle (it needs the network once)")
    prefix = data_home() / "tracel" / BUNDLE
    if (prefix / SENTINEL).is_file():
        print(environment(prefix))
        return
    cache = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else pathlib.Path.home() / ".cache/effnet-cluster/llvm")
    pypi.fetch("fetch_llvm", cache, WHEELS, REQUIREMENTS)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    unpack(cache, prefix)
    check(prefix)
    (prefix / SENTINEL).write_text("mlc-llvm-static 23.1.1.post0 from PyPI\n")
    print(environment(prefix))


if __name__ == "__main__":
    main()
