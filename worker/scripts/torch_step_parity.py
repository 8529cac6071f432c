#!/usr/bin/env python3
"""Redo, in PyTorch, the phase-1 step that `cargo run --example step_parity` wrote, and print
where the two part: resized input, frozen Lite0 features, logits, loss, gradients and the head
after one Adam step. Each stage starts from OUR previous stage's values, so a difference is that
stage's own, not one carried along.

    python3 worker/scripts/torch_step_parity.py OUT.safetensors CIFAR_BIN_DIR LITE0_PTH

Needs torch, numpy and safetensors; uses torch_transfer.py's model and data code.
"""
import json
import pathlib
import sys

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import torch_transfer as tt  # noqa: E402


def main():
    dump, data, weights = sys.argv[1:4]
    with safe_open(dump, "pt") as f:
        ours = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    indices = json.loads(meta["indices"])
    size, lr, eps = int(meta["size"]), float(meta["lr"]), float(meta["adam_epsilon"])
    (train_x, train_y), _, _ = tt.read_cifar(data)
    labels = torch.from_numpy(train_y[indices])
    rows = []

    def compare(stage, theirs, mine):
        theirs, mine = theirs.detach().float(), mine.detach().float()
        diff = (theirs - mine).abs().max().item()
        scale = theirs.abs().max().item()
        rows.append((stage, diff, diff / scale if scale else float("nan")))

    assert torch.equal(labels.float(), ours["labels"]), "the labels differ: not the same images"
    compare("input (resize 32 -> %d)" % size, tt.to_input(train_x[indices], size), ours["input"])
    backbone = tt.Lite0()
    backbone.load(weights)
    backbone.eval()
    with torch.no_grad():
        features = backbone(ours["input"]).mean(dim=(2, 3))
    compare("backbone features (pooled)", features, ours["features"])
    head = torch.nn.Linear(ours["w0"].shape[0], ours["w0"].shape[1])
    with torch.no_grad():
        head.weight.copy_(ours["w0"].T)  # Burn stores [in, out]
        head.bias.copy_(ours.get("b0", torch.zeros(head.out_features)))
    logits = head(ours["features"])
    compare("logits", logits, ours["logits"])
    loss = F.cross_entropy(logits, labels)
    compare("loss", loss.reshape(1), ours["loss"])
    loss.backward()
    compare("gradient of the weight", head.weight.grad.T, ours["grad_w"])
    compare("gradient of the bias", head.bias.grad, ours["grad_b"])
    torch.optim.Adam(head.parameters(), lr=lr, eps=eps).step()
    compare("weight after one Adam step", head.weight.T, ours["w1"])
    compare("bias after one Adam step", head.bias, ours["b1"])
    print(f"{len(indices)} images at {size} px; torch {torch.__version__}")
    print(f"| {'stage':<34} | {'max abs diff':>12} | {'max rel diff':>12} |")
    print(f"|{'-' * 36}|{'-' * 14}|{'-' * 14}|")
    for stage, diff, rel in rows:
        print(f"| {stage:<34} | {diff:>12.3e} | {rel:>12.3e} |")


if __name__ == "__main__":
    main()
