"""Baseline: one optimizer step of steadygrad.optim vs torch.optim's foreach path.

Times ``opt.step()`` for Adagrad, RMSprop, Adam and AdamW on N float32 parameters split into a few
big tensors, alternating torch and steadygrad within each repetition so that both see the same
machine state, and reports medians, the ratio (torch time / steadygrad time, > 1 means steadygrad
is faster), the bytes an ideal step must move, and the fraction of the copy bandwidth measured in
the same run.

    python benchmarks/optim_baseline.py [--params 10_000_000] [--tensors 4] [--repeats 15] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

import steadygrad as sg

# Bytes an ideal fp32 step reads and writes per parameter: p, g and each state tensor read,
# p and each state tensor written.
BYTES_PER_PARAM = {"Adagrad": 20, "RMSprop": 20, "Adam": 28, "AdamW": 28}


def make_params(n: int, tensors: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sizes = [n // tensors] * tensors
    sizes[-1] += n - sum(sizes)
    params = []
    for size in sizes:
        p = torch.nn.Parameter(torch.randn(size, generator=g))
        p.grad = torch.randn(size, generator=g)
        params.append(p)
    return params


def copy_bandwidth(n: int, repeats: int) -> float:
    """Bytes per second of a large fp32 copy (read + write), median of ``repeats``."""
    src, dst = torch.randn(n), torch.empty(n)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 8 * n / statistics.median(times)


def bench(n: int, tensors: int, repeats: int, warmup: int = 3) -> dict:
    bandwidth = copy_bandwidth(max(n, 1 << 25), repeats)  # at least 128 MiB: past the caches
    results = {}
    for name in BYTES_PER_PARAM:
        opts = {
            "torch": getattr(torch.optim, name)(make_params(n, tensors, 0), foreach=True),
            "steadygrad": getattr(sg.optim, name)(make_params(n, tensors, 0)),
        }
        for opt in opts.values():
            for _ in range(warmup):
                opt.step()
        times: dict[str, list[float]] = {k: [] for k in opts}
        for _ in range(repeats):
            for key, opt in opts.items():
                t0 = time.perf_counter()
                opt.step()
                times[key].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        ideal = BYTES_PER_PARAM[name] * n / bandwidth
        results[name] = {
            "torch_ms": 1e3 * med["torch"],
            "steadygrad_ms": 1e3 * med["steadygrad"],
            "ratio": med["torch"] / med["steadygrad"],
            "bytes_per_param": BYTES_PER_PARAM[name],
            "torch_bw_fraction": ideal / med["torch"],
            "steadygrad_bw_fraction": ideal / med["steadygrad"],
        }
        del opts
    return {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "params": n,
        "tensors": tensors,
        "repeats": repeats,
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "results": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=10_000_000)
    parser.add_argument("--tensors", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    report = bench(args.params, args.tensors, args.repeats)
    print(
        f"{report['params']:,} fp32 parameters in {report['tensors']} tensors; {report['machine']}; "
        f"torch {report['torch']}; copy bandwidth {report['copy_bandwidth_GBps']:.1f} GB/s"
    )
    print(
        f"{'optimizer':10s} {'torch ms':>9s} {'sg ms':>8s} {'ratio':>6s} {'B/param':>8s} {'torch bw':>9s} {'sg bw':>6s}"
    )
    for name, r in report["results"].items():
        print(
            f"{name:10s} {r['torch_ms']:9.2f} {r['steadygrad_ms']:8.2f} {r['ratio']:6.2f} {r['bytes_per_param']:8d} "
            f"{r['torch_bw_fraction']:9.0%} {r['steadygrad_bw_fraction']:6.0%}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
