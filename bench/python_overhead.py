#!/usr/bin/env python3
"""What a call through hbn's Python binding costs over the same C++ call.

    PYTHONPATH=BUILD/python python3 bench/python_overhead.py BUILD/bench/hbn_bench \
        [--markdown-out FILE]

Runs hbn_bench (bench/batch_norm_bench.cpp) on hbn's cases below, then times
the same calls from Python, on NumPy arrays and on PyTorch CPU tensors of the
same sizes and dtypes, filled from the same ranges, and prints one markdown
table of them side by side:

    case | C++ | Python, NumPy | NumPy − C++ | Python, torch | torch − C++ | C++/Python (NumPy)

- C++: the median of 5 repetitions of hbn_bench's real time per call. It
  writes into outputs allocated once; Python's calls return new arrays, so
  their times include allocating the output.
- Python: the median of 5 runs of a timeit loop (its count from
  Timer.autorange), per call.
- On the 2x2 example (tiny) the differences are the binding's overhead, in µs;
  at the mid size (32x64x56x56) C++/Python is the speed ratio (1.00: C++
  speed).

Both sides run on hbn's CPU backend (HBN_DEVICE=cpu, set here). Needs NumPy
and torch next to the hbn package; takes about a minute.
"""
import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import timeit
from dataclasses import dataclass

os.environ["HBN_DEVICE"] = "cpu"

import hbn  # noqa: E402  (after HBN_DEVICE)
import numpy as np  # noqa: E402
import torch  # noqa: E402

REPETITIONS = 5
# (N, C, H, W), as bench/batch_norm_bench.cpp's kSizes (float32).
DIMS = {"tiny": (2, 2), "mid": (32, 64, 56, 56)}
# Each size's unit in the table: its name and seconds per unit.
UNITS = {"tiny": ("µs", 1e-6), "mid": ("ms", 1e-3)}
UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}


@dataclass(frozen=True)
class Case:
    mode: str    # inference, training (the forward) or backward_training
    layout: str  # nchw or nhwc
    size: str    # tiny or mid

    @property
    def benchmark_name(self):
        return f"BM/{self.mode}/float32/{self.layout}/{self.size}/hbn/real_time"

    @property
    def title(self):
        return f"{self.mode} float32 {self.layout.upper()} {self.size}"

    @property
    def shape(self):
        """The dense shape in memory order: (N, C, H, W) or (N, H, W, C)."""
        dims = DIMS[self.size]
        return dims if self.layout == "nchw" else (dims[0], *dims[2:], dims[1])

    @property
    def channels(self):
        return DIMS[self.size][1]


CASES = [
    Case("inference", "nchw", "tiny"),
    Case("training", "nchw", "tiny"),
    Case("inference", "nchw", "mid"),
    Case("training", "nchw", "mid"),
    Case("inference", "nhwc", "mid"),
    Case("backward_training", "nchw", "mid"),
]


def cpp_seconds(binary, cases):
    """{case: hbn_bench's median real time per call, in seconds}, from one run."""
    pattern = "^(" + "|".join(re.escape(case.benchmark_name) for case in cases) + ")$"
    command = [binary, f"--benchmark_filter={pattern}", "--benchmark_format=json",
               f"--benchmark_repetitions={REPETITIONS}",
               "--benchmark_report_aggregates_only=true"]
    run = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    medians = {b["run_name"]: b["real_time"] * UNIT_SECONDS[b["time_unit"]]
               for b in json.loads(run.stdout)["benchmarks"]
               if b.get("aggregate_name") == "median" and not b.get("error_occurred")}
    missing = [case.benchmark_name for case in cases if case.benchmark_name not in medians]
    if missing:
        sys.exit(f"hbn_bench reported no median for {', '.join(missing)}")
    return {case: medians[case.benchmark_name] for case in cases}


def make_inputs(case):
    """The case's arrays, uniform in hbn_bench's ranges (float32)."""
    rng = np.random.default_rng(0)

    def uniform(low, high, shape):
        return rng.uniform(low, high, shape).astype(np.float32)

    c = case.channels
    inputs = {"x": uniform(-2, 2, case.shape), "running_mean": uniform(-0.5, 0.5, c),
              "running_var": uniform(0.5, 1.5, c), "weight": uniform(0.5, 1.5, c),
              "bias": uniform(-0.5, 0.5, c)}
    if case.mode.startswith("backward"):
        inputs["dy"] = uniform(-1, 1, case.shape)
        _, inputs["saved_mean"], inputs["saved_inv_std"] = hbn.batch_norm_training(
            inputs["x"], inputs["running_mean"].copy(), inputs["running_var"].copy(),
            inputs["weight"], inputs["bias"], data_format=case.layout.upper())
    return inputs


def make_call(case, a):
    """A function of no arguments making the case's call on the arrays a."""
    data_format = case.layout.upper()
    if case.mode == "backward_training":
        return lambda: hbn.batch_norm_backward(
            a["dy"], a["x"], a["weight"], saved_mean=a["saved_mean"],
            saved_inv_std=a["saved_inv_std"], training=True, data_format=data_format)
    training = case.mode == "training"
    return lambda: hbn.batch_norm(a["x"], a["running_mean"], a["running_var"], a["weight"],
                                  a["bias"], training, data_format=data_format)


def python_seconds(call):
    """The median over REPETITIONS timeit loops of one call's time, in seconds."""
    timer = timeit.Timer(call)
    number, _ = timer.autorange()
    return statistics.median(timer.repeat(REPETITIONS, number)) / number


def time_python(case):
    """(NumPy, torch) seconds per call of the case from Python."""
    arrays = make_inputs(case)
    tensors = {name: torch.from_numpy(array.copy()) for name, array in arrays.items()}
    return python_seconds(make_call(case, arrays)), python_seconds(make_call(case, tensors))


def cpu_model():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


def table_row(case, cpp, numpy_s, torch_s):
    unit, seconds = UNITS[case.size]

    def duration(s):
        return f"{s / seconds:.2f} {unit}"

    def overhead(s):
        return f"{(s - cpp) / seconds:+.2f} {unit}"

    return (f"| {case.title} | {duration(cpp)} | {duration(numpy_s)} | {overhead(numpy_s)} "
            f"| {duration(torch_s)} | {overhead(torch_s)} | {cpp / numpy_s:.2f} |")


def markdown(cpp, python):
    lines = [
        "### Python call overhead",
        "",
        f"{cpu_model()}, {os.cpu_count()} threads, {datetime.date.today().isoformat()}; "
        f"medians of {REPETITIONS} runs each, hbn on its CPU backend. C++ writes into "
        "preallocated outputs; Python returns new ones.",
        "",
        "| case | C++ | Python, NumPy | NumPy − C++ | Python, torch | torch − C++ "
        "| C++/Python (NumPy) |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    lines += [table_row(case, cpp[case], *python[case]) for case in CASES]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("hbn_bench", help="the hbn_bench binary (build/bench/hbn_bench)")
    parser.add_argument("--markdown-out", help="also write the table to this file")
    args = parser.parse_args()
    cpp = cpp_seconds(args.hbn_bench, CASES)
    python = {case: time_python(case) for case in CASES}
    text = markdown(cpp, python)
    sys.stdout.write(text)
    if args.markdown_out:
        with open(args.markdown_out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
