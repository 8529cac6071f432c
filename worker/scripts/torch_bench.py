"""PyTorch CPU reference for `worker bench model`: torchvision EfficientNet-B0 throughput.

Prints one JSON line: {"torch": VERSION, "threads": N, "infer": IMG_PER_SEC, "train": IMG_PER_SEC}.
Arguments: batch size, image size, warmup iterations, measured iterations, threads.
"""
import json
import sys
import time

import torch
import torchvision

batch, size, warmup, iters, threads = (int(a) for a in sys.argv[1:6])
torch.manual_seed(0)
torch.set_num_threads(threads)
x = torch.rand(batch, 3, size, size) * 255
y = torch.arange(batch) * 37 % 1000


def median(v):
    return sorted(v)[len(v) // 2]


model = torchvision.models.efficientnet_b0().eval()
times = []
with torch.inference_mode():
    for i in range(warmup + iters):
        t = time.perf_counter()
        model(x)
        if i >= warmup:
            times.append(time.perf_counter() - t)
infer = batch / median(times)

model = torchvision.models.efficientnet_b0().train()
opt = torch.optim.Adam(model.parameters(), lr=1e-4)
loss_fn = torch.nn.CrossEntropyLoss()
times = []
for i in range(warmup + iters):
    t = time.perf_counter()
    opt.zero_grad()
    loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()
    if i >= warmup:
        times.append(time.perf_counter() - t)
train = batch / median(times)
print(json.dumps({"torch": torch.__version__, "threads": threads, "infer": infer, "train": train}))
