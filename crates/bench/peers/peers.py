#!/usr/bin/env python3
"""Peers of arfuse, timed on the same shapes on the GPU machine, and the merged table.

    python3 peers.py --arfuse arfuse.json --json peers.json      # time the peers, merge, print
    python3 peers.py --arfuse arfuse.json --peers peers.json     # merge only (no GPU needed)

What is timed (PyTorch on the machine, bf16, CUDA-graph captured in every mode, rotating input
sets as arfuse-bench does, p10/p50/p90 over repeated batches from CUDA events):
  * torch.compile'd residual add + RMSNorm alone, in the order of arfuse's contract
    (residual_out = x + r; out = w * bf16(residual_out * rsqrt(mean(residual_out^2) + eps))):
    the one-GPU floor for the norm, with no all-reduce at all.
  * device-to-device copy bandwidth (cross-check of arfuse-bench's floor).
  * with two or more GPUs: NCCL all_reduce + that add+RMSNorm. On one GPU this is skipped (NCCL
    does not run two ranks on one GPU), and said so in the output.
"""
import argparse
import json
import os
import sys
import time


def percentiles(samples):
    s = sorted(samples)
    at = lambda q: s[min(len(s) - 1, round(q * (len(s) - 1)))]
    return {"p10": at(0.1), "p50": at(0.5), "p90": at(0.9), "samples": len(s)}


def time_peers(shapes, iters, repeats, warmup):
    import torch

    assert torch.cuda.is_available(), "no CUDA device"
    dev = torch.device("cuda")
    eps = 1e-6

    def add_rmsnorm(x, r, w):
        s = x + r
        f = s.float()
        inv = torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + eps)
        return w * (f * inv).to(x.dtype), s

    # One compilation per hidden size (rows are dynamic), and room for every one of them.
    for knob in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 1024)
    compiled = torch.compile(add_rmsnorm)
    results = []
    gen = torch.Generator(device=dev).manual_seed(7)
    for mode, rows, hidden in shapes:
        t0 = time.time()
        elems = rows * hidden
        sets = max(2, min(8, -(-(256 << 20) // (4 * elems * 2))))
        xs = [torch.randn(rows, hidden, device=dev, generator=gen).to(torch.bfloat16) for _ in range(sets)]
        rs = [torch.randn(rows, hidden, device=dev, generator=gen).to(torch.bfloat16) for _ in range(sets)]
        w = (1 + 0.1 * torch.randn(hidden, device=dev, generator=gen)).to(torch.bfloat16)
        for t in xs + rs:
            torch._dynamo.maybe_mark_dynamic(t, 0)
        n = iters if mode == "decode" else max(1, iters // 10)
        # Compile and warm up outside the capture.
        for k in range(3):
            compiled(xs[k % sets], rs[k % sets], w)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            with torch.cuda.graph(graph, stream=stream):
                outs = [compiled(xs[k % sets], rs[k % sets], w) for k in range(n)]
        torch.cuda.synchronize()
        # Check the contract on one call (bf16 add is exactly rounded; the norm within 1 ulp).
        out, s = add_rmsnorm(xs[0], rs[0], w)
        got_out, got_s = outs[0]
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(got_s, s), f"{rows}x{hidden}: torch.compile residual differs from eager"
        for _ in range(warmup):
            graph.replay()
        samples = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1e3 / n)
        del graph, outs
        stats = percentiles(samples)
        results.append({"peer": "torch.compile add+rmsnorm", "mode": mode, "rows": rows, "hidden": hidden,
                        "stats": stats})
        print(f"  torch.compile add+rmsnorm {mode} {rows}x{hidden}: p50 {stats['p50']:.2f} us "
              f"({time.time() - t0:.1f} s)", file=sys.stderr, flush=True)
    # Copy bandwidth.
    a = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    b.copy_(a)
    samples = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        b.copy_(a)
        end.record()
        end.synchronize()
        samples.append(2 * a.numel() / (start.elapsed_time(end) * 1e-3) / 1e9)
    copy_gbs = percentiles(samples)["p50"]
    skipped = []
    if torch.cuda.device_count() < 2:
        skipped.append("NCCL all_reduce + add+rmsnorm, symmetric-memory all-reduce: need 2 or more GPUs "
                       f"(this machine has {torch.cuda.device_count()})")
    else:
        skipped.append("multi-GPU peers: not implemented in this script yet (the two-GPU issue)")
    return {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(sys.argv),
        "copy_gbs": copy_gbs,
        "results": results,
        "skipped": skipped,
    }


def merge(arfuse, peers):
    """The merged Markdown table and the issue's targets, as lines."""
    torch_us = {(r["mode"], r["rows"], r["hidden"]): r["stats"]["p50"] for r in peers["results"]}
    lines = [f"arfuse: {arfuse['device']}, {arfuse['date']}, world {arfuse['world_size']} "
             f"({arfuse['ranks_per_gpu']} ranks per GPU); peers: {peers['device']}, torch {peers['torch']}, "
             f"{peers['date']}", ""]
    targets = []
    for mode in ("decode", "prefill"):
        rows = [r for r in arfuse["rows"] if r["mode"] == mode]
        if not rows:
            continue
        lines.append(f"{mode}: p50 µs per call")
        lines.append("")
        lines.append("| shape | arfuse unfused | arfuse fused | path | speedup | torch.compile add+RMSNorm "
                     "(no all-reduce) | fused / torch |")
        lines.append("|---|---:|---:|---|---:|---:|---:|")
        for r in rows:
            paths = {p["path"]: p["stats"]["p50"] for p in r["paths"]}
            unfused, fused = paths.get("unfused"), paths.get(r["dispatched"])
            shape = (r["shape"]["rows"], r["shape"]["hidden"])
            t = torch_us.get((mode, *shape))
            fmt = lambda v, d=1: "-" if v is None else f"{v:.{d}f}"
            lines.append(f"| {shape[0]}x{shape[1]} | {fmt(unfused)} | {fmt(fused)} | {r['dispatched']} | "
                         f"{fmt(unfused / fused if unfused and fused else None, 2)} | {fmt(t)} | "
                         f"{fmt(fused / t if fused and t else None, 2)} |")
            if mode == "decode" and shape[0] <= 16 and 4096 <= shape[1] <= 8192 and unfused and fused:
                targets.append(("fused >= 1.6x unfused", f"{shape[0]}x{shape[1]}", unfused / fused, unfused / fused >= 1.6))
            if mode == "decode" and shape == (1, 4096) and fused and t:
                targets.append(("fused 1x4096 <= 1.5x torch.compile", "1x4096", fused / t, fused / t <= 1.5))
            if mode == "prefill" and shape == (8192, 4096) and fused and t:
                targets.append(("prefill 8192x4096 <= 1.35x torch.compile", "8192x4096", fused / t, fused / t <= 1.35))
        lines.append("")
    if targets:
        lines.append("| target | shape | measured | met |")
        lines.append("|---|---|---:|---|")
        for name, shape, value, met in targets:
            lines.append(f"| {name} | {shape} | {value:.2f} | {'yes' if met else 'NO'} |")
        lines.append("")
    for s in peers.get("skipped", []):
        lines.append(f"skipped: {s}")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arfuse", required=True, help="arfuse-bench --json output (shapes are taken from it)")
    ap.add_argument("--peers", help="merge this peers JSON instead of timing")
    ap.add_argument("--json", help="write the peers' timings here")
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    with open(args.arfuse) as f:
        arfuse = json.load(f)
    if args.peers:
        with open(args.peers) as f:
            peers = json.load(f)
    else:
        shapes = [(r["mode"], r["shape"]["rows"], r["shape"]["hidden"]) for r in arfuse["rows"]]
        peers = time_peers(shapes, args.iters, args.repeats, args.warmup)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(peers, f, indent=1)
    print("\n".join(merge(arfuse, peers)))


if __name__ == "__main__":
    main()
