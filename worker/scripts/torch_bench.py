"""PyTorch reference for `worker bench model`: torchvision EfficientNet-B0 throughput.

Prints one JSON line: {"torch": VERSION, "threads": N, "infer": IMG_PER_SEC, "train": ...,
"phase1": ..., "phase1_cached": ..., "phase2": ...}, the same workloads as the Rust bench:
inference; a full training step (ImageNet top); phase 1 (frozen backbone in eval mode, a new
10-class head trained); phase 1 from precomputed pooled features (the head alone); phase 2
(everything trained but BatchNorm, which is in eval mode with its parameters frozen).
Arguments: batch size, image size, warmup iterations, measured iterations, threads, and
optionally the device (`cpu`, the default, or `cuda` for GPU 0, where times wait for the GPU;
without a CUDA GPU it falls back to the CPU and says so in "device").
"""
import json
import sys
import time

import torch
import torchvision

batch, size, warmup, iters, threads = (int(a) for a in sys.argv[1:6])
device = torch.device(sys.argv[6] if len(sys.argv) > 6 else "cpu")
if device.type == "cuda" and not torch.cuda.is_available():
    # The worker's GPU is a Vulkan device PyTorch cannot use (a software one, say).
    device = torch.device("cpu")
torch.manual_seed(0)
torch.set_num_threads(threads)
x = torch.rand(batch, 3, size, size, device=device) * 255


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


def median(v):
    return sorted(v)[len(v) // 2]


def timed(step):
    times = []
    for i in range(warmup + iters):
        t = time.perf_counter()
        step()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return batch / median(times)


def transfer_model():
    model = torchvision.models.efficientnet_b0()
    model.classifier[1] = torch.nn.Linear(1280, 10)
    return model.to(device)


def train_rate(model, params, labels, forward):
    opt = torch.optim.Adam(params, lr=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad()
        loss = loss_fn(forward(), labels)
        loss.backward()
        opt.step()

    return timed(step)


results = {"torch": torch.__version__, "threads": threads, "device": str(device)}

model = torchvision.models.efficientnet_b0().to(device).eval()
with torch.inference_mode():
    results["infer"] = timed(lambda: model(x))

model = torchvision.models.efficientnet_b0().to(device).train()
labels = (torch.arange(batch) * 37 % 1000).to(device)
results["train"] = train_rate(model, model.parameters(), labels, lambda: model(x))

labels = (torch.arange(batch) * 37 % 10).to(device)

# Phase 1: the backbone frozen and in inference mode; only the head trains.
model = transfer_model()
for p in model.features.parameters():
    p.requires_grad = False
model.train()
model.features.eval()
results["phase1"] = train_rate(model, model.classifier.parameters(), labels, lambda: model(x))

# Phase 1 from cached features: pooled backbone outputs computed once.
with torch.no_grad():
    pooled = torch.flatten(model.avgpool(model.features(x)), 1)
results["phase1_cached"] = train_rate(
    model, model.classifier.parameters(), labels, lambda: model.classifier(pooled)
)

# Phase 2: everything trains except BatchNorm (eval mode, parameters frozen).
model = transfer_model().train()
for m in model.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
        m.eval()
        for p in m.parameters():
            p.requires_grad = False
trainable = [p for p in model.parameters() if p.requires_grad]
results["phase2"] = train_rate(model, trainable, labels, lambda: model(x))

print(json.dumps(results))
