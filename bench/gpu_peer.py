#!/usr/bin/env python3
"""PyTorch's cuDNN batch norm on the cases of hbn_gpu_bench, and one table.

    python3 bench/gpu_peer.py HBN_GPU_BENCH.csv [--budget SECONDS] [--reps R] [--warmup W]

Reads the CSV that build/.../hbn_gpu_bench wrote (bench/gpu_bench.cpp), times
the same cases with PyTorch on the same GPU, at the same sizes, dtypes and
layouts (channels_last tensors for NHWC; float16 and bfloat16 data with
float32 per-channel tensors, as in hbn's run), and prints ONE markdown table:

    case | hbn ms | hbn GB/s | copy GB/s | hbn/copy | cuDNN ms | cudnn/hbn | hbn wall ms | peer

- hbn ms: the median GPU time of one hbn call (CUDA events around it on the
  default stream; the wall time where events were missing); hbn wall ms: the
  median wall time of the call, which returns once its work is done.
- GB/s: bytes_moved over that time, 1 GB = 1e9 bytes; bytes_moved is x read
  and y written (forward) or x and dy read and dx written (backward).
- copy GB/s: cuMemcpyDtoD moving the same bytes; hbn/copy = hbn GB/s over
  copy GB/s (1.00 is copy speed).
- cuDNN ms: the median of torch.cuda.Event times of the peer's call(s);
  cudnn/hbn = cuDNN ms over hbn ms (above 1: hbn is faster).
- peer: what was timed. cuDNN (aten::cudnn_batch_norm, its backward) where
  cuDNN has the operation: the forward in both modes and the training
  backward. cuDNN has no inference backward (autograd runs
  native_batch_norm_backward there, and so does this), and the sync rows
  (hbn with a no-op all_reduce) are compared with the kernels of PyTorch's
  SyncBatchNorm minus its collectives (batch_norm_stats,
  batch_norm_gather_stats_with_counts, batch_norm_elemt; backward_reduce,
  backward_elemt). A peer that fails falls back to F.batch_norm (or
  autograd-free native calls) and says so.

Timing: W warm-ups (3), then the median of R (20) calls, fewer when a call is
slow. --budget stops starting new cases after SECONDS (their cells read
"n/a (budget)"). Without torch, or without CUDA in it, the table has hbn's
columns only and a line above it says why. Python 3.8+, standard library plus
torch.
"""

import argparse
import csv
import math
import statistics
import sys
import time

MOMENTUM = 0.1
EPS = 1e-5
CASE_BUDGET_S = 4.0  # the timed calls of one case, roughly


def read_rows(path):
    """The '#' comment lines and the CSV rows of hbn_gpu_bench's output."""
    comments, lines = [], []
    with open(path, newline="") as f:
        for line in f:
            if line.startswith("#"):
                comments.append(line[1:].strip())
            elif line.strip():
                lines.append(line)
    if not lines or not lines[0].startswith("case,"):
        return comments, [], " ".join(l.strip() for l in lines) or "no output"
    rows = []
    for row in csv.DictReader(lines):
        if row.get("case") and row.get("status") is not None:  # a line cut short has no status
            rows.append(row)
    return comments, rows, None


def number(text):
    try:
        value = float(text)
    except (TypeError, ValueError):
        return math.nan
    return value


def fmt(value, digits=3):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if abs(value) >= 100:
        return "%.0f" % value
    if abs(value) >= 10:
        return "%.1f" % value
    return "%.*f" % (digits, value)


def hbn_ms(row):
    gpu = number(row.get("gpu_ms"))
    return gpu if not math.isnan(gpu) else number(row.get("wall_ms"))


class Peer:
    """Times the torch counterpart of hbn's cases on one device."""

    def __init__(self, torch, warmup, reps):
        self.torch = torch
        self.F = torch.nn.functional
        self.warmup = warmup
        self.reps = reps
        self.data_key = None
        self.data = None

    def tensors(self, dtype, layout, n, c, h, w):
        torch = self.torch
        key = (dtype, layout, n, c, h, w)
        if key != self.data_key:
            self.data = None
            torch.cuda.empty_cache()
            dt = getattr(torch, dtype)  # float32, float16, bfloat16: torch's names too
            fmt_ = torch.channels_last if layout == "nhwc" else torch.contiguous_format
            g = torch.Generator(device="cuda")
            g.manual_seed(1234)

            def uniform(shape, lo, hi, dtype_=torch.float32, memory_format=torch.contiguous_format):
                t = torch.empty(shape, dtype=dtype_, device="cuda", memory_format=memory_format)
                return t.uniform_(lo, hi, generator=g)

            self.data = {
                "x": uniform((n, c, h, w), -2, 2, dt, fmt_),
                "dy": uniform((n, c, h, w), -1, 1, dt, fmt_),
                "weight": uniform((c,), 0.5, 1.5),
                "bias": uniform((c,), -0.5, 0.5),
                "running_mean": uniform((c,), -0.5, 0.5),
                "running_var": uniform((c,), 0.5, 1.5),
            }
            self.data_key = key
        return self.data

    def time(self, fn):
        torch = self.torch
        last = 0.0
        for _ in range(self.warmup):
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            last = time.perf_counter() - t0
        reps = self.reps
        if last > 0:
            reps = max(1, min(reps, int(CASE_BUDGET_S / last)))
        gpu, wall = [], []
        for _ in range(reps):
            start = torch.cuda.Event(enable_timing=True)
            stop = torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            start.record()
            fn()
            stop.record()
            torch.cuda.synchronize()
            wall.append((time.perf_counter() - t0) * 1e3)
            gpu.append(start.elapsed_time(stop))
        return statistics.median(gpu), statistics.median(wall)

    # ---- the peers; each returns (callable, label) ----
    def cudnn_forward(self, d, training):
        aten = self.torch.ops.aten
        args = (d["x"], d["weight"], d["bias"], d["running_mean"], d["running_var"], training, MOMENTUM, EPS)
        aten.cudnn_batch_norm(*args)  # raises where cuDNN does not take the case
        return (lambda: aten.cudnn_batch_norm(*args)), "cuDNN cudnn_batch_norm"

    def fallback_forward(self, d, training):
        F = self.F
        return (lambda: F.batch_norm(d["x"], d["running_mean"], d["running_var"], d["weight"], d["bias"],
                                     training, MOMENTUM, EPS)), "F.batch_norm (cudnn_batch_norm failed)"

    def cudnn_backward_training(self, d):
        aten = self.torch.ops.aten
        x, dy, w = d["x"], d["dy"], d["weight"]
        _, save_mean, save_var, reserve = aten.cudnn_batch_norm(x, w, d["bias"], d["running_mean"],
                                                                d["running_var"], True, MOMENTUM, EPS)
        args = (x, dy, w, d["running_mean"], d["running_var"], save_mean, save_var, EPS, reserve)
        aten.cudnn_batch_norm_backward(*args)
        return (lambda: aten.cudnn_batch_norm_backward(*args)), "cuDNN cudnn_batch_norm_backward"

    def native_backward(self, d, training, why):
        aten = self.torch.ops.aten
        x, dy, w = d["x"], d["dy"], d["weight"]
        if training:
            _, save_mean, save_invstd = aten.native_batch_norm(x, w, d["bias"], d["running_mean"],
                                                               d["running_var"], True, MOMENTUM, EPS)
        else:
            save_mean = save_invstd = None
        args = (dy, x, w, d["running_mean"], d["running_var"], save_mean, save_invstd, training, EPS,
                [True, True, True])
        aten.native_batch_norm_backward(*args)
        return (lambda: aten.native_batch_norm_backward(*args)), "aten native_batch_norm_backward" + why

    def sync_forward(self, d):
        torch = self.torch
        x, c = d["x"], d["x"].shape[1]
        count = torch.full((1,), x.numel() // c, dtype=torch.float32, device="cuda")

        def call():
            mean, invstd = torch.batch_norm_stats(x, EPS)
            # (SyncBatchNorm all-gathers mean, invstd and count here.)
            mean, invstd = torch.batch_norm_gather_stats_with_counts(
                x, mean.unsqueeze(0), invstd.unsqueeze(0), d["running_mean"], d["running_var"], MOMENTUM, EPS,
                count)
            return torch.batch_norm_elemt(x, d["weight"], d["bias"], mean, invstd, EPS)

        call()
        return call, "SyncBatchNorm kernels: batch_norm_stats, _gather_stats_with_counts, _elemt"

    def sync_backward(self, d):
        torch = self.torch
        x, dy, w, c = d["x"], d["dy"], d["weight"], d["x"].shape[1]
        mean, invstd = torch.batch_norm_stats(x, EPS)
        count = torch.full((1,), x.numel() // c, dtype=torch.int32, device="cuda")

        def call():
            sum_dy, sum_dy_xmu, grad_weight, grad_bias = torch.batch_norm_backward_reduce(
                dy, x, mean, invstd, w, True, True, True)
            # (SyncBatchNorm all-reduces sum_dy and sum_dy_xmu here.)
            return torch.batch_norm_backward_elemt(dy, x, mean, invstd, w, sum_dy, sum_dy_xmu, count)

        call()
        return call, "SyncBatchNorm kernels: batch_norm_backward_reduce, _backward_elemt"

    def prepare(self, row):
        """The peer's callable and label for an hbn row, trying fallbacks."""
        d = self.tensors(row["dtype"], row["layout"], int(row["n"]), int(row["c"]), int(row["h"]),
                         int(row["w"]))
        backward = row["pass"] == "backward"
        mode = row["mode"]
        attempts = []
        if mode == "sync":
            attempts.append(self.sync_backward if backward else self.sync_forward)
        if not backward:
            training = mode != "inference"
            attempts += [lambda d_: self.cudnn_forward(d_, training),
                         lambda d_: self.fallback_forward(d_, training)]
        elif mode == "inference":
            attempts.append(lambda d_: self.native_backward(d_, False, " (cuDNN has no inference backward)"))
        else:
            attempts += [self.cudnn_backward_training,
                         lambda d_: self.native_backward(d_, True, " (cuDNN's backward failed)")]
        errors = []
        for attempt in attempts:
            try:
                fn, label = attempt(d)
                if errors:
                    label += " [after: " + "; ".join(errors) + "]"
                return fn, label
            except Exception as e:  # a peer that does not take the case: try the next
                errors.append(short_error(e))
        raise RuntimeError("; ".join(errors))


def short_error(e, length=80):
    text = str(e).strip().split("\n")[0]
    return type(e).__name__ + ": " + (text[:length] + "..." if len(text) > length else text)


def torch_or_reason():
    try:
        import torch
    except Exception as e:
        return None, "torch cannot be imported (%s: %s)" % (type(e).__name__, e)
    try:
        if not torch.cuda.is_available():
            return None, "torch %s has no usable CUDA device" % torch.__version__
        torch.backends.cudnn.enabled = True
        if not torch.backends.cudnn.is_available():
            return torch, "torch %s has CUDA but no cuDNN: the forward and training backward use " \
                          "PyTorch's native kernels" % torch.__version__
    except Exception as e:
        return None, "torch's CUDA is not usable (%s: %s)" % (type(e).__name__, e)
    return torch, None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("csv")
    parser.add_argument("--budget", type=float, default=0, help="start no case after this many seconds")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    began = time.monotonic()

    comments, rows, problem = read_rows(args.csv)
    for c in comments:
        print("hbn: " + c)
    if problem is not None:
        print("No hbn results in %s: %s" % (args.csv, problem))
        # A skipped benchmark (no usable CUDA) is not an error of this step.
        return 0 if problem.startswith("CUDA benchmark skipped") else 1
    copies = {(r["dtype"], r["pass"]): r for r in rows if r["impl"] == "copy"}
    cases = [r for r in rows if r["impl"] != "copy"]

    torch, reason = torch_or_reason()
    peer = None
    if torch is not None:
        peer = Peer(torch, args.warmup, args.reps)
        print("peer: torch %s, CUDA %s, cuDNN %s, on %s" % (
            torch.__version__, torch.version.cuda, torch.backends.cudnn.version(),
            torch.cuda.get_device_name(0)))
    if reason:
        print("peer: " + reason + ("" if torch is not None else "; the peer columns are n/a"))

    table = []
    for r in cases:
        ms = hbn_ms(r)
        wall = number(r.get("wall_ms"))
        moved = number(r.get("bytes_moved"))
        ok = r["status"] == "ok"
        gbps = moved / (ms * 1e-3) / 1e9 if ok and ms > 0 else math.nan
        copy = copies.get((r["dtype"], r["pass"]))
        copy_gbps = math.nan
        if copy is not None and copy["status"] == "ok":
            copy_ms = hbn_ms(copy)
            copy_gbps = number(copy["bytes_moved"]) / (copy_ms * 1e-3) / 1e9 if copy_ms > 0 else math.nan
        peer_ms, label = math.nan, "n/a"
        if peer is None:
            label = "n/a (no torch CUDA)"
        elif args.budget > 0 and time.monotonic() - began > args.budget:
            label = "n/a (budget)"
        else:
            fn = None
            try:
                fn, label = peer.prepare(r)
                peer_ms, _ = peer.time(fn)
            except Exception as e:
                label = "failed: " + short_error(e, 300)
            fn = None  # the next case may need the memory its tensors hold
            if "out of memory" in label:
                torch.cuda.empty_cache()
        name = r["case"] if ok else "%s (%s)" % (r["case"], r["status"][:100])
        table.append([
            name, fmt(ms if ok else math.nan), fmt(gbps, 1), fmt(copy_gbps, 1),
            fmt(gbps / copy_gbps if copy_gbps > 0 else math.nan, 2), fmt(peer_ms),
            fmt(peer_ms / ms if ok and ms > 0 else math.nan, 2), fmt(wall if ok else math.nan), label])

    print("hbn ms, cuDNN ms: median GPU (event) time of one call; hbn wall ms: the call's median wall "
          "time. hbn/copy: hbn GB/s over the copy's (1.00 = copy speed); cudnn/hbn above 1: hbn is faster.")
    print()
    print("| case | hbn ms | hbn GB/s | copy GB/s | hbn/copy | cuDNN ms | cudnn/hbn | hbn wall ms | peer |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for cells in table:
        print("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    if not table:
        print("| (no hbn cases in %s) | | | | | | | | |" % args.csv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
