#!/usr/bin/env python3
"""Peers of arfuse, timed on the same shapes on the GPU machine, and the merged table.

    python3 peers.py --arfuse arfuse.json --json peers.json      # time the peers, merge, print
    python3 peers.py --arfuse arfuse.json --peers peers.json     # merge only (no GPU needed)
    python3 peers.py --self-check                                 # CPU-safe parts, no GPU needed

What is timed (PyTorch on the machine, bf16, CUDA-graph captured in every mode, rotating input
sets as arfuse-bench does, p10/p50/p90 over repeated batches from CUDA events):
  * torch.compile'd residual add + RMSNorm alone, in the order of arfuse's contract
    (residual_out = x + r; out = w * bf16(residual_out * rsqrt(mean(residual_out^2) + eps))):
    the one-GPU floor for the norm, with no all-reduce at all.
  * with an FP8 spec in the arfuse JSON (`arfuse-bench --fp8 FORMAT:SCALING`, its `fp8` field):
    torch.compile'd add + RMSNorm + FP8 quantisation of `out` (`torch.float8_e4m3fn`; per-token
    dynamic `scale = max(amax / 448, 1 / (448 * 512))` or the per-tensor static scale, `q =
    sat(y / scale)`), the one-GPU peer of arfuse's fused FP8 output; its codes are compared with
    the eager function's (torch.compile may divide differently) and the count reported.
    e4m3fnuz and per-group are not timed (said so in the output).
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


EPS = 1e-6
# The FP8 formats torch has, by the names arfuse uses, with their largest value.
FP8_MAX = {"e4m3fn": 448.0, "e4m3fnuz": 240.0}


def parse_fp8(arfuse):
    """The arfuse JSON's FP8 spec as (format, scaling, static scale or None), or None without one.

    Read from its `fp8` field (`FORMAT:SCALING` as `arfuse-bench --fp8` takes it), or, for reports
    written before that field, from `--fp8` in its command line."""
    spec = arfuse.get("fp8") or ""
    if not spec:
        words = arfuse.get("command", "").split()
        for i, word in enumerate(words):
            if word == "--fp8" and i + 1 < len(words):
                spec = words[i + 1]
            elif word.startswith("--fp8="):
                spec = word.split("=", 1)[1]
    if not spec:
        return None
    fmt, _, scaling = spec.partition(":")
    scale = None
    if scaling.startswith("per-tensor="):
        scaling, scale = "per-tensor", float(scaling.split("=", 1)[1])
    return fmt, scaling, scale


def fp8_unsupported(fp8):
    """Why this script does not time torch's FP8 quantisation for `fp8`, or None if it does."""
    fmt, scaling, _ = fp8
    if fmt != "e4m3fn":
        return f"torch.compile add+rmsnorm+fp8: format {fmt} not timed (only e4m3fn, the H200's)"
    if scaling not in ("per-token", "per-tensor"):
        return f"torch.compile add+rmsnorm+fp8: scaling {scaling} not timed (per-token and per-tensor only)"
    return None


def add_rmsnorm(x, r, w):
    """arfuse's contract order: residual_out = x + r; out = w * round(residual_out * inv)."""
    import torch

    s = x + r
    f = s.float()
    inv = torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + EPS)
    return w * (f * inv).to(x.dtype), s


def make_add_rmsnorm_fp8(fp8):
    """add+RMSNorm, then `out` quantised as arfuse's contract says (y = f32(out), q = sat(RNE(y /
    scale)), per-token scale = max(amax / fmax, f32(1 / (fmax * 512)))): returns (codes, scales,
    out, residual_out); scales is the static scale (a 0-d tensor) per tensor."""
    import torch

    fmt, scaling, static = fp8
    fmax = FP8_MAX[fmt]
    dtype = {"e4m3fn": torch.float8_e4m3fn, "e4m3fnuz": getattr(torch, "float8_e4m3fnuz", None)}[fmt]
    min_scale = float(torch.tensor(1.0 / (fmax * 512.0), dtype=torch.float32))

    def add_rmsnorm_fp8(x, r, w):
        out, s = add_rmsnorm(x, r, w)
        y = out.float()
        if scaling == "per-token":
            scale = torch.clamp(y.abs().amax(-1, keepdim=True) / fmax, min=min_scale)
        else:
            scale = torch.full((), static, dtype=torch.float32, device=y.device)
        # torch's cast rounds to nearest even but does not saturate: clamp first.
        q = torch.clamp(y / scale, -fmax, fmax).to(dtype)
        return q, scale, out, s

    return add_rmsnorm_fp8


def fp8_text(fp8):
    fmt, scaling, scale = fp8
    return f"{fmt}:{scaling}" + (f"={scale}" if scale is not None else "")


def time_one(torch, fn, eager, xs, rs, w, n, repeats, warmup, what):
    """p10/p50/p90 µs per call of `fn` over `n` calls captured in one CUDA graph (rotating input
    sets), and what its first call's outputs show against `eager` ({} or code_mismatches)."""
    sets = len(xs)
    # Compile and warm up outside the capture.
    for k in range(3):
        fn(xs[k % sets], rs[k % sets], w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        with torch.cuda.graph(graph, stream=stream):
            outs = [fn(xs[k % sets], rs[k % sets], w) for k in range(n)]
    torch.cuda.synchronize()
    # Check the contract on one call (bf16 add is exactly rounded; the norm within 1 ulp).
    want = eager(xs[0], rs[0], w)
    got = outs[0]
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(got[-1], want[-1]), f"{what}: torch.compile residual differs from eager"
    extra = {}
    if len(want) == 4:  # the FP8 peer: (codes, scales, out, residual_out)
        codes = lambda q: q.view(torch.uint8)
        extra["code_mismatches"] = int((codes(got[0]) != codes(want[0])).sum().item())
        extra["codes"] = got[0].numel()
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
    return percentiles(samples), extra


def time_peers(shapes, iters, repeats, warmup, fp8=None):
    import torch

    assert torch.cuda.is_available(), "no CUDA device"
    dev = torch.device("cuda")

    # One compilation per hidden size (rows are dynamic), and room for every one of them.
    for knob in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 1024)
    compiled = torch.compile(add_rmsnorm)
    peers = [("torch.compile add+rmsnorm", compiled, add_rmsnorm)]
    skipped = []
    if fp8 is not None:
        why = fp8_unsupported(fp8)
        if why:
            skipped.append(why)
            print(f"  {why}", file=sys.stderr, flush=True)
        else:
            eager_fp8 = make_add_rmsnorm_fp8(fp8)
            peers.append(("torch.compile add+rmsnorm+fp8", torch.compile(eager_fp8), eager_fp8))
    results = []
    gen = torch.Generator(device=dev).manual_seed(7)
    for mode, rows, hidden in shapes:
        elems = rows * hidden
        sets = max(2, min(8, -(-(256 << 20) // (4 * elems * 2))))
        xs = [torch.randn(rows, hidden, device=dev, generator=gen).to(torch.bfloat16) for _ in range(sets)]
        rs = [torch.randn(rows, hidden, device=dev, generator=gen).to(torch.bfloat16) for _ in range(sets)]
        w = (1 + 0.1 * torch.randn(hidden, device=dev, generator=gen)).to(torch.bfloat16)
        for t in xs + rs:
            torch._dynamo.maybe_mark_dynamic(t, 0)
        n = iters if mode == "decode" else max(1, iters // 10)
        for name, fn, eager in peers:
            t0 = time.time()
            try:
                result = time_one(torch, fn, eager, xs, rs, w, n, repeats, warmup, f"{name} {rows}x{hidden}")
            except Exception as e:  # a peer that fails on one shape is reported, the rest still run
                why = f"{name} {mode} {rows}x{hidden}: {type(e).__name__}: {e}"
                skipped.append(why)
                print(f"  FAILED {why}", file=sys.stderr, flush=True)
                continue
            stats, extra = result
            row = {"peer": name, "mode": mode, "rows": rows, "hidden": hidden, "stats": stats, **extra}
            if name.endswith("+fp8"):
                row["fp8"] = fp8_text(fp8)
            results.append(row)
            print(f"  {name} {mode} {rows}x{hidden}: p50 {stats['p50']:.2f} us ({time.time() - t0:.1f} s)"
                  + (f", {extra['code_mismatches']} codes differ from eager" if "code_mismatches" in extra else ""),
                  file=sys.stderr, flush=True)
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
    by_peer = lambda name: {(r["mode"], r["rows"], r["hidden"]): r["stats"]["p50"]
                            for r in peers["results"] if r.get("peer", name) == name}
    torch_us = by_peer("torch.compile add+rmsnorm")
    torch_fp8 = by_peer("torch.compile add+rmsnorm+fp8")
    fp8_spec = next((r.get("fp8") for r in peers["results"] if r.get("peer") == "torch.compile add+rmsnorm+fp8"), None)
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
    fmt = lambda v, d=1: "-" if v is None else f"{v:.{d}f}"
    for mode in ("decode", "prefill"):
        rows = [r for r in arfuse["rows"] if r["mode"] == mode
                and any(p["path"].endswith("+fp8") for p in r["paths"])]
        if not rows:
            continue
        spec = arfuse.get("fp8") or fp8_spec or "?"
        if fp8_spec and arfuse.get("fp8") and not arfuse["fp8"].startswith(fp8_spec.split("=")[0]):
            lines.append(f"note: arfuse quantised {arfuse['fp8']}, torch {fp8_spec}")
        lines.append(f"{mode}, FP8 out ({spec}): p50 µs per call")
        lines.append("")
        lines.append("| shape | path | arfuse fused | + FP8 fused | + separate quant | torch.compile add+RMSNorm "
                     "| torch.compile add+RMSNorm+FP8 (no all-reduce) | FP8 fused / plain | FP8 fused / torch FP8 |")
        lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            paths = {p["path"]: p["stats"]["p50"] for p in r["paths"]}
            path = r["dispatched"] if f"{r['dispatched']}+fp8" in paths else "fused-1stage"
            plain, fused, quant = paths.get(path), paths.get(f"{path}+fp8"), paths.get(f"{path}+quant")
            shape = (r["shape"]["rows"], r["shape"]["hidden"])
            t, tq = torch_us.get((mode, *shape)), torch_fp8.get((mode, *shape))
            lines.append(f"| {shape[0]}x{shape[1]} | {path} | {fmt(plain)} | {fmt(fused)} | {fmt(quant)} | {fmt(t)} | "
                         f"{fmt(tq)} | {fmt(fused / plain if fused and plain else None, 2)} | "
                         f"{fmt(fused / tq if fused and tq else None, 2)} |")
            if mode == "decode" and fused and plain:
                targets.append(("FP8 fused <= 1.1x plain fused", f"{shape[0]}x{shape[1]}", fused / plain,
                                fused / plain <= 1.1))
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


def fp8_contract_codes(torch, y, scale, fmax):
    """The contract's codes of f32 `y` for f32 `scale` (broadcast), independently of torch's
    float8 cast: the nearest e4m3fn value of the format's 254 by search, ties to the even code,
    saturated, NaN 0x7f, the sign kept. As uint8."""
    codes = torch.arange(0, 127, dtype=torch.int32)  # 0x00..0x7e: every non-negative number
    e, m = codes // 8, (codes % 8).double()
    values = torch.where(e == 0, m / 8 * 2.0 ** -6, (1 + m / 8) * torch.pow(2.0, (e - 7).double()))
    v = (y / scale).double()  # the f32 quotient, exactly
    a = v.abs().clamp(max=fmax).unsqueeze(-1)
    d = (values - a).abs()
    best = d.min(-1, keepdim=True).values
    # Among the nearest (at most two, a tie), the even code.
    cand = torch.where(d == best, codes, torch.full_like(codes, 1 << 20))
    even = torch.where(cand % 2 == 0, cand, torch.full_like(codes, 1 << 20)).min(-1).values
    code = torch.where(even < (1 << 20), even, cand.min(-1).values)
    code = torch.where(v.signbit(), code | 0x80, code)
    code = torch.where(v.isnan(), torch.full_like(code, 0x7f), code)
    return code.to(torch.uint8)


def self_check():
    """The CPU-safe parts, on CPU torch if it is installed: 0 when every check passed."""
    failures = []

    def check(what, ok, detail=""):
        print(f"  {'ok  ' if ok else 'FAIL'} {what}" + (f": {detail}" if detail and not ok else ""))
        if not ok:
            failures.append(what)

    check("spec from the fp8 field", parse_fp8({"fp8": "e4m3fn:per-token"}) == ("e4m3fn", "per-token", None))
    check("spec from the command line",
          parse_fp8({"command": "arfuse-bench --fp8 e4m3fn:per-tensor=0.01"}) == ("e4m3fn", "per-tensor", 0.01))
    check("no spec", parse_fp8({"command": "arfuse-bench"}) is None)
    check("e4m3fnuz not timed", fp8_unsupported(("e4m3fnuz", "per-token", None)) is not None)
    check("per-group not timed", fp8_unsupported(("e4m3fn", "per-group", None)) is not None)
    arfuse = {"device": "H200", "date": "d", "world_size": 2, "ranks_per_gpu": 1, "fp8": "e4m3fn:per-token",
              "rows": [{"mode": "decode", "shape": {"rows": 1, "hidden": 4096}, "dispatched": "fused-1stage",
                        "paths": [{"path": p, "stats": {"p50": v}} for p, v in
                                  [("unfused", 8.0), ("fused-1stage", 3.0), ("fused-1stage+fp8", 3.3),
                                   ("fused-1stage+quant", 5.0)]]}]}
    peers = {"device": "H200", "torch": "x", "date": "d", "skipped": [], "results": [
        {"peer": "torch.compile add+rmsnorm", "mode": "decode", "rows": 1, "hidden": 4096, "stats": {"p50": 2.0}},
        {"peer": "torch.compile add+rmsnorm+fp8", "fp8": "e4m3fn:per-token", "mode": "decode", "rows": 1,
         "hidden": 4096, "stats": {"p50": 2.5}}]}
    text = "\n".join(merge(arfuse, peers))
    check("merge: the plain row keeps torch's add+rmsnorm", "| 1x4096 | 8.0 | 3.0 | fused-1stage | 2.67 | 2.0 | 1.50 |" in text, text)
    check("merge: the FP8 row", "| 1x4096 | fused-1stage | 3.0 | 3.3 | 5.0 | 2.0 | 2.5 | 1.10 | 1.32 |" in text, text)
    check("merge: the 1.1x target", "| FP8 fused <= 1.1x plain fused | 1x4096 | 1.10 | yes |" in text, text)
    try:
        import torch
    except ImportError as e:
        print(f"  skip the torch checks: {e}")
        torch = None
    if torch is not None:
        print(f"  torch {torch.__version__} on CPU")
        gen = torch.Generator().manual_seed(7)
        rows, hidden = 6, 512
        x = torch.randn(rows, hidden, generator=gen).to(torch.bfloat16)
        r = torch.randn(rows, hidden, generator=gen).to(torch.bfloat16)
        w = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(torch.bfloat16)
        x[1] = 0.0  # with r[1] = 0: a zero row, amax 0
        r[1] = 0.0
        x[2, :64] = 3e4  # saturating for a static scale of 1 / 448
        for spec in [("e4m3fn", "per-token", None), ("e4m3fn", "per-tensor", 1.0 / 448)]:
            what = fp8_text(spec)
            eager = make_add_rmsnorm_fp8(spec)
            q, scale, out, s = eager(x, r, w)
            y = out.float()
            if spec[1] == "per-token":
                min_scale = torch.tensor(1.0 / (448 * 512), dtype=torch.float32)
                want_scale = torch.maximum(y.abs().amax(-1, keepdim=True) / 448.0, min_scale)
                check(f"{what}: scales are max(amax / 448, min_scale)", torch.equal(scale, want_scale))
                check(f"{what}: the zero row's scale is min_scale", float(scale[1]) == float(min_scale))
            want = fp8_contract_codes(torch, y, scale, 448.0)
            got = q.view(torch.uint8)
            diff = int((got != want).sum())
            check(f"{what}: eager codes are the contract's (search encoder)", diff == 0, f"{diff} codes differ")
            if spec[1] == "per-tensor":
                check(f"{what}: something saturates", bool((got & 0x7f == 0x7e).any()))
            try:
                cq, cscale, _, cs = torch.compile(eager)(x, r, w)
                cdiff = int((cq.view(torch.uint8) != got).sum())
                check(f"{what}: torch.compile on CPU residual equals eager", torch.equal(cs, s))
                print(f"  info {what}: torch.compile on CPU: {cdiff} of {got.numel()} codes differ from eager")
            except Exception as e:  # no C++ compiler, an inductor gap: say why and go on
                print(f"  skip {what}: torch.compile on CPU failed: {type(e).__name__}: {str(e).splitlines()[0]}")
    print("self-check:", "FAILED " + ", ".join(failures) if failures else "ok")
    return 1 if failures else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arfuse", help="arfuse-bench --json output (shapes and the --fp8 spec are taken from it)")
    ap.add_argument("--self-check", action="store_true",
                    help="run the CPU-safe parts (spec parsing, the FP8 function eager and compiled on CPU "
                         "torch against the contract, the merge) and exit")
    ap.add_argument("--peers", help="merge this peers JSON instead of timing")
    ap.add_argument("--json", help="write the peers' timings here")
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    if args.self_check:
        sys.exit(self_check())
    if not args.arfuse:
        ap.error("--arfuse is required (or --self-check)")
    with open(args.arfuse) as f:
        arfuse = json.load(f)
    if args.peers:
        with open(args.peers) as f:
            peers = json.load(f)
    else:
        shapes = [(r["mode"], r["shape"]["rows"], r["shape"]["hidden"]) for r in arfuse["rows"]]
        fp8 = parse_fp8(arfuse)
        peers = time_peers(shapes, args.iters, args.repeats, args.warmup, fp8)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(peers, f, indent=1)
    print("\n".join(merge(arfuse, peers)))


if __name__ == "__main__":
    main()
