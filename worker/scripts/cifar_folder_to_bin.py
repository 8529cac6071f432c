#!/usr/bin/env python3
"""Write a CIFAR-10 image-folder tree (train/<class>/*.jpg, test/<class>/*.jpg, 32x32) in the
official binary layout (cifar-10-batches-bin/data_batch_{1..5}.bin, test_batch.bin,
batches.meta.txt: records of one label byte and 3,072 bytes, the R, G and B planes).

A folder tree is sorted by class, so "file order" there is every airplane first; the official
release (and TFDS, which slices it for the tutorial's train[:10%]) is a mix of classes. This
writes the images in one seeded random order, so that slices of the file order are mixes too
and every tool that reads the output (the worker, worker/scripts/torch_transfer.py) sees the
same images in the same order.

    python3 worker/scripts/cifar_folder_to_bin.py SRC DST [--seed 0]

Needs Pillow and NumPy. Prints the SHA-256 of every file it wrote.
"""
import argparse
import hashlib
import pathlib
import sys

import numpy as np
from PIL import Image

SIDE = 32
TRAIN_FILES = 5


def records(root, split, classes):
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted((root / split / name).glob("*"))
        files = [f for f in files if f.suffix.lower() in (".jpg", ".jpeg", ".png")]
        paths += files
        labels += [label] * len(files)
    return paths, np.array(labels, dtype=np.uint8)


def encode(path, label):
    with Image.open(path) as img:
        rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    if rgb.shape != (SIDE, SIDE, 3):
        sys.exit(f"cifar_folder_to_bin: {path} is {rgb.shape[1]}x{rgb.shape[0]}, expected 32x32")
    return bytes([label]) + rgb.transpose(2, 0, 1).tobytes()


def write(path, paths, labels, order):
    blob = b"".join(encode(paths[i], labels[i]) for i in order)
    path.write_bytes(blob)
    print(f"{hashlib.sha256(blob).hexdigest()}  {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=pathlib.Path)
    parser.add_argument("dst", type=pathlib.Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not (args.src / "train").is_dir():
        sys.exit(f"cifar_folder_to_bin: {args.src} has no train/ folder (expected train/<class>/*.jpg)")
    classes = sorted(p.name for p in (args.src / "train").iterdir() if p.is_dir())
    out = args.dst / "cifar-10-batches-bin"
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    paths, labels = records(args.src, "train", classes)
    order = rng.permutation(len(paths))
    for k, part in enumerate(np.array_split(order, TRAIN_FILES), start=1):
        write(out / f"data_batch_{k}.bin", paths, labels, part)
    paths, labels = records(args.src, "test", classes)
    if paths:
        write(out / "test_batch.bin", paths, labels, rng.permutation(len(paths)))
    (out / "batches.meta.txt").write_text("\n".join(classes) + "\n")


if __name__ == "__main__":
    main()
