"""PyTorch CPU counterpart of `cargo run --release -p effnet --example flex_ops`: the same ops
at the same shapes, median of 5 timed runs after one warm-up, as a markdown table."""
import time

import torch
import torch.nn.functional as F


def median_ms(op, iters=5):
    op()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        op()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


torch.manual_seed(0)
act = (16, 96, 112, 112)
x = torch.randn(act)
xg = torch.randn(act, requires_grad=True)
w = torch.randn(96, 1, 3, 3)
wg = torch.randn(96, 1, 3, 3, requires_grad=True)
x3 = torch.randn(16, 144, 56, 56, requires_grad=True)
w3 = torch.randn(24, 144, 1, 1, requires_grad=True)
w5 = torch.randn(144, 1, 5, 5, requires_grad=True)
xs = torch.randn(16, 96, 56, 56, requires_grad=True)
gs = torch.randn(16, 96, 1, 1, requires_grad=True)

rows = []
with torch.no_grad():
    rows.append(("silu forward [16,96,112,112]", median_ms(lambda: F.silu(x))))
rows.append(("silu forward+backward", median_ms(lambda: F.silu(xg).sum().backward())))
with torch.no_grad():
    rows.append(("depthwise 3x3 conv forward", median_ms(lambda: F.conv2d(x, w, padding=1, groups=96))))
rows.append((
    "depthwise 3x3 conv forward+backward",
    median_ms(lambda: F.conv2d(xg, wg, padding=1, groups=96).sum().backward()),
))
rows.append((
    "depthwise 5x5 stride 2 [16,144,56,56] fwd+bwd",
    median_ms(lambda: F.conv2d(x3, w5, stride=2, padding=2, groups=144).sum().backward()),
))
rows.append(("1x1 conv 144->24 at 56x56 fwd+bwd", median_ms(lambda: F.conv2d(x3, w3).sum().backward())))
rows.append((
    "SE pool + gate [16,96,56,56] fwd+bwd",
    median_ms(lambda: (xs * torch.sigmoid(gs + xs.mean((2, 3), keepdim=True))).sum().backward()),
))

print(f"| op (PyTorch {torch.__version__} CPU, {torch.get_num_threads()} threads) | median ms |")
print("| --- | ---: |")
for name, ms in rows:
    print(f"| {name} | {ms:.1f} |")
