"""Peer: Opacus (PyTorch, CPU) DP-SGD step vs its non-private step on the tiny NFNet.

    .venv-bench/bin/python -m benchmarks.peers_opacus [--batch 64] [--iters 3] [--json out.json]

Needs the `bench` extras (torch CPU build + opacus) in a separate venv; never imported by tests.
The network is dpft's `nfnet_tiny` rebuilt in PyTorch (same widths/depths/group width, WS-conv with
gain and bias, tanh-GELU x 1.7015, squeeze-excite, SkipInit gain, avg-pool shortcut, final conv,
mean pool, linear head; no dropout/stochastic depth so that every layer has an Opacus grad sampler or
its functorch fallback). DP step = GradSampleModule + DPOptimizer(sigma=1, C=1) step; non-private =
plain backward + SGD step. Same batch and resolution as benchmarks.dp_overhead (32x32).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import common

GELU_GAMMA = 1.7015043497085571


def act(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh") * GELU_GAMMA


class WSConv2d(nn.Module):
    """Scaled weight-standardised conv: weight [O, I/groups, k, k], gain [O], bias [O]; NCHW, SAME pad."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin // groups, k, k) / math.sqrt(cin // groups * k * k))
        self.gain = nn.Parameter(torch.ones(cout))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.stride, self.groups, self.k = stride, groups, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        fan_in = w[0].numel()
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        scale = torch.rsqrt(torch.clamp(var * fan_in, min=1e-4)) * self.gain.view(-1, 1, 1, 1)
        w = w * scale - mean * scale
        pad = (self.k - 1) // 2 if self.stride == 1 else 0
        if self.stride > 1:  # TF SAME padding for even inputs: pad (0, k - stride) at the end
            x = F.pad(x, (max(self.k - self.stride, 0) // 2, max(self.k - self.stride, 0) - max(self.k - self.stride, 0) // 2) * 2)
        return F.conv2d(x, w, self.bias, stride=self.stride, padding=pad, groups=self.groups)


class Scale(nn.Module):
    """Learned scalar gain (SkipInit), a leaf module so Opacus can sample its gradient."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain


class SqueezeExcite(nn.Module):
    def __init__(self, ch: int, ratio: float = 0.5):
        super().__init__()
        hidden = max(1, int(ch * ratio))
        self.linear, self.linear_1 = nn.Linear(ch, hidden), nn.Linear(hidden, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear_1(F.relu(self.linear(x.mean(dim=(2, 3)))))
        return torch.sigmoid(h)[:, :, None, None]


class NFBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, beta: float, group_size: int, alpha: float = 0.2):
        super().__init__()
        width = int(cout * 0.5)
        groups = width // group_size
        self.beta, self.alpha, self.stride = beta, alpha, stride
        self.conv0 = WSConv2d(cin, width, 1)
        self.conv1 = WSConv2d(width, width, 3, stride, groups)
        self.conv1b = WSConv2d(width, width, 3, 1, groups)
        self.conv2 = WSConv2d(width, cout, 1)
        self.proj = WSConv2d(cin, cout, 1) if (stride > 1 or cin != cout) else None
        self.se, self.skip = SqueezeExcite(cout), Scale()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = act(x) * self.beta
        shortcut = x
        if self.stride > 1:
            shortcut = F.avg_pool2d(out, 2, 2, ceil_mode=True, count_include_pad=False)
        elif self.proj is not None:
            shortcut = out
        if self.proj is not None:
            shortcut = self.proj(shortcut)
        out = self.conv2(act(self.conv1b(act(self.conv1(act(self.conv0(out)))))))
        out = self.se(out) * 2 * out
        return self.skip(out) * self.alpha + shortcut


class TinyNFNet(nn.Module):
    """PyTorch twin of dpft's `nfnet_tiny`: NCHW [B, 3, H, W] -> logits [B, num_classes]."""

    def __init__(self, num_classes: int = 10, width=(16, 32, 64, 64), group_width: int = 8,
                 stem=(8, 8, 16), alpha: float = 0.2):
        super().__init__()
        s0, s1, s2 = stem
        ch = width[0] // 2
        self.stem = nn.ModuleList([WSConv2d(3, s0, 3, 2), WSConv2d(s0, s1, 3), WSConv2d(s1, s2, 3),
                                   WSConv2d(s2, ch, 3, 2)])
        blocks, expected = [], 1.0
        for i, (w, stride) in enumerate(zip(width, (1, 2, 2, 2))):
            blocks.append(NFBlock(ch, w, stride, 1.0 / expected, group_width, alpha))
            expected = (1.0 + alpha ** 2) ** 0.5  # depth 1 per stage: reset then one block
            ch = w
        self.blocks = nn.ModuleList(blocks)
        self.final_conv = WSConv2d(ch, 2 * ch, 1)
        self.head = nn.Linear(2 * ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, conv in enumerate(self.stem):
            x = conv(x)
            if i < 3:
                x = act(x)
        for b in self.blocks:
            x = b(x)
        return self.head(act(self.final_conv(x)).mean(dim=(2, 3)))


def bench(batch: int, iters: int, resolution: int = 32) -> list[dict]:
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    x = torch.randn(batch, 3, resolution, resolution)
    y = torch.randint(0, 10, (batch,))
    model = TinyNFNet()
    n_params = sum(p.numel() for p in model.parameters())

    plain_opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def plain_step():
        plain_opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        plain_opt.step()

    dp_model = GradSampleModule(TinyNFNet())
    dp_opt = DPOptimizer(torch.optim.SGD(dp_model.parameters(), lr=0.1), noise_multiplier=1.0,
                         max_grad_norm=1.0, expected_batch_size=batch)

    def dp_step():
        dp_opt.zero_grad()
        F.cross_entropy(dp_model(x), y).backward()
        dp_opt.step()

    steps = {"nonprivate": plain_step, "dp": dp_step}
    for f in steps.values():
        f()  # warm-up
    times = {k: [] for k in steps}
    for _ in range(iters):
        for k, f in steps.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return [{"peer": "opacus", "framework": f"torch {torch.__version__}", "model": "nfnet_tiny (PyTorch twin)",
             "params": n_params, "resolution": resolution, "batch": batch, "method": k,
             "examples_per_s": batch / med[k], "step_s": med[k],
             "time_ratio_vs_nonprivate": med[k] / med["nonprivate"]} for k in steps]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = bench(args.batch, args.iters)
    return common.emit_rows(rows, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
