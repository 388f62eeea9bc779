#!/usr/bin/env python3
"""Summarizes hbn_bench's Google Benchmark JSON: a markdown table and a plot.

    python3 bench/report.py RESULTS.json [--md OUT.md] [--png OUT.png]
    python3 bench/report.py --schedules SOURCE.json... --md OUT.md

Prints the tables and writes them to OUT.md, and the plot to OUT.png (by
default next to RESULTS.json, with its name). Benchmarks are named
BM/<mode>/<dtype>/<layout>/<size>/<impl>, mode being inference or training
(the forward) or backward_inference or backward_training (the backward), dtype
float32, float16 or bfloat16. For
each case (mode, dtype, layout, size) a table, one for the forward and one for
the backward, gives hbn's time and the GB/s of every implementation (the same
bytes for all: x read plus y written in the forward; x and dy read plus dx
written in the backward), then the ratios copy/hbn and peer/hbn, each
time_other / time_hbn: copy/hbn = 1 means hbn runs as fast as a copy of those
bytes; peer/hbn > 1 means hbn is faster than the peer.

The fused epilogue's modes (inference_relu, training_add_relu,
backward_training_relu, ...: a mode followed by _relu or _add_relu) get a
table of their own: hbn's fused time, then hbn/copy, hbn/unfused,
hbn/onednn and hbn/plain BN, each time_hbn / time_other, plain BN being hbn
on the mode without the epilogue (same dtype, layout and size): below 1, the
fused call is faster than the other.

With --schedules, each JSON is one schedule source's run
(scripts/bench_schedules.sh, context hbn_schedule): the table gives hbn's
time per case and source, and each source's time over the manual one's.
"""
import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

IMPLS = ["hbn", "copy", "onednn", "torch", "hbn_unfused"]
PEERS = ["onednn", "torch"]
# The epilogue modes' suffixes, _add_relu before the _relu it ends with.
EPILOGUES = ["_add_relu", "_relu"]
ORDER = {
    "size": ["tiny", "mid", "large"],
    "mode": ["inference", "inference_relu", "inference_add_relu",
             "training", "training_relu", "training_add_relu",
             "backward_inference", "backward_training",
             "backward_training_relu", "backward_training_add_relu"],
    "dtype": ["float32", "float16", "bfloat16"],
    "layout": ["nchw", "nhwc"],
}
UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}
# Each pass (pass_of): its title, and the bytes its GB/s count.
PASSES = [
    ("forward", "hbn::batch_norm", "x read plus y written"),
    ("backward", "hbn::batch_norm_backward, all three gradients",
     "x and dy read plus dx written (12 bytes per float32 element, the least it can move)"),
]


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def load(path):
    """Returns (context, {case: {impl: result}}), a case being
    (mode, dtype, layout, size) and a result a dict with seconds, gbps, error,
    label."""
    data = json.loads(Path(path).read_text())
    runs = defaultdict(list)
    for b in data.get("benchmarks", []):
        parts = b.get("run_name", b["name"]).split("/")
        if len(parts) < 6 or parts[0] != "BM":
            continue
        if b.get("run_type") == "aggregate" and b.get("aggregate_name") != "median":
            continue
        runs[tuple(parts[1:5]), parts[5]].append(b)

    cases = defaultdict(dict)
    for (case, impl), bs in runs.items():
        # With --benchmark_repetitions, take the median (Google Benchmark's
        # own median aggregate if it was reported).
        medians = [b for b in bs if b.get("run_type") == "aggregate"]
        ok = [b for b in (medians or bs) if not b.get("error_occurred")]
        if not ok:
            cases[case][impl] = {"error": bs[0].get("error_message", "error"), "label": ""}
            continue
        seconds = statistics.median(b["real_time"] * UNIT_SECONDS[b["time_unit"]] for b in ok)
        gbps = statistics.median(b.get("bytes_per_second", 0) / 1e9 for b in ok)
        cases[case][impl] = {"seconds": seconds, "gbps": gbps, "label": ok[0].get("label", "")}
    return data.get("context", {}), cases


def pass_of(case):
    """forward or backward: the modes backward_* are the backward's."""
    return "backward" if case[0].startswith("backward_") else "forward"


def epilogue_of(case):
    """The mode's epilogue suffix (_relu, _add_relu), or "" for plain batch norm."""
    return next((e for e in EPILOGUES if case[0].endswith(e)), "")


def plain_case(case):
    """The case of hbn's plain batch norm that an epilogue case adds to."""
    return (case[0].removesuffix(epilogue_of(case)),) + case[1:]


def rank(axis, value):
    """value's place on the axis; values not in ORDER (a newer benchmark's)
    go last."""
    return ORDER[axis].index(value) if value in ORDER[axis] else len(ORDER[axis])


def case_key(case):
    mode, dtype, layout, size = case
    return (pass_of(case) == "backward", rank("size", size), rank("mode", mode),
            rank("dtype", dtype), rank("layout", layout))


def fmt_time(s):
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if s >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s / 1e-9:.3g} ns"


def fmt_gbps(r):
    if r is None:
        return "—"
    if "error" in r:
        return "n/a" if r["error"].startswith("unavailable") else "error"
    return f"{r['gbps']:.3g}"


def fmt_result_time(r):
    """r's time, or why it has none."""
    return fmt_time(r["seconds"]) if r and "seconds" in r else fmt_gbps(r)


def ratio(a, b):
    """a's time over b's."""
    if not a or not b or "seconds" not in a or "seconds" not in b:
        return "—"
    return f"{a['seconds'] / b['seconds']:.2f}"


def describe(names):
    """'mode/dtype/layout/size' names, as a product of their values when they
    form one (e.g. 'inference, training × float16 × nchw, nhwc × tiny, mid')."""
    cases = {tuple(n.split("/")) for n in names}
    axes = [sorted({c[i] for c in cases}, key=lambda v, a=a: (rank(a, v), v))
            for i, a in enumerate(["mode", "dtype", "layout", "size"])]
    product = 1
    for values in axes:
        product *= len(values)
    if product == len(cases):
        return " × ".join(", ".join(values) for values in axes)
    return ", ".join(names)


def markdown(context, cases):
    date = context.get("date", "unknown date")
    threads = context.get("threads", "?")
    extra = [f"{k}={context[k]}" for k in ("hbn_source", "OMP_WAIT_POLICY", "OMP_NUM_THREADS",
                                            "HL_NUM_THREADS") if k in context]
    if context.get("load_avg"):
        extra.append(f"load average at start: {context['load_avg'][0]:.2f}")
    lines = [
        "# hbn batch_norm benchmark",
        "",
        f"CPU: {cpu_model()} ({context.get('num_cpus', '?')} CPUs, {threads} threads); "
        f"date: {date}" + "".join(f"; {e}" for e in extra),
        "",
        "copy/hbn and peer/hbn are time_other / time_hbn: copy/hbn = 1 is the speed of a copy "
        "of the bytes the GB/s count (the faster, timed per case, of memcpy and a copy with "
        "streaming stores: the lines under each table say which), peer/hbn > 1 means hbn is "
        "faster.",
    ]
    for name, title, counted in PASSES:
        group = sorted((c for c in cases if pass_of(c) == name and not epilogue_of(c)),
                       key=case_key)
        if not group:
            continue
        lines += [
            "",
            f"## {name.capitalize()}: {title}",
            "",
            f"GB/s count the bytes of {counted}.",
            "",
            "| case | hbn time | hbn GB/s | copy GB/s | onednn GB/s | torch GB/s "
            "| copy/hbn | onednn/hbn | torch/hbn |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for case in group:
            r = cases[case]
            hbn = r.get("hbn")
            cells = ["/".join(case), fmt_result_time(hbn)]
            cells += [fmt_gbps(r.get(i)) for i in ["hbn", "copy"] + PEERS]
            cells += [ratio(r.get(i), hbn) for i in ["copy"] + PEERS]
            lines.append("| " + " | ".join(cells) + " |")

    group = sorted((c for c in cases if epilogue_of(c)), key=case_key)
    if group:
        lines += [
            "",
            "## Fused epilogues: output = relu(bn(x) [+ residual]), and its backward",
            "",
            "hbn is one fused call; hbn_unfused is hbn's plain batch norm and a separate oneDNN "
            "pass (ReLU, or add with a ReLU post-op, over y; the backward's ReLU backward "
            "before it); onednn is fuse_norm_relu. GB/s count the bytes of x read plus y "
            "written (forward), plus the residual read (add_relu); x, dy and the forward's y "
            "read plus dx written (backward), plus grad_residual written (add_relu). The "
            "ratios are time_other / time_hbn, as in the tables above (above 1: fused hbn is "
            "faster); plain BN is hbn on the same case without the epilogue.",
            "",
            "| case | hbn time | hbn GB/s | copy/hbn | hbn_unfused time | unfused/hbn "
            "| onednn time | onednn/hbn | plain BN/hbn |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for case in group:
            r = cases[case]
            hbn = r.get("hbn")
            plain = cases.get(plain_case(case), {}).get("hbn")
            cells = ["/".join(case), fmt_result_time(hbn), fmt_gbps(hbn), ratio(r.get("copy"), hbn),
                     fmt_result_time(r.get("hbn_unfused")), ratio(r.get("hbn_unfused"), hbn),
                     fmt_result_time(r.get("onednn")), ratio(r.get("onednn"), hbn),
                     ratio(plain, hbn)]
            lines.append("| " + " | ".join(cells) + " |")

    # Why a cell is n/a or error, which oneDNN implementation ran, and what
    # the copies were.
    notes = defaultdict(list)
    for case in sorted(cases, key=case_key):
        for impl, r in cases[case].items():
            if "error" in r:
                notes[f"{impl}: {r['error']}"].append("/".join(case))
            elif impl in ("onednn", "copy", "hbn_unfused") and r["label"]:
                notes[f"{impl} ran {r['label']}"].append("/".join(case))
    if notes:
        lines += ["", "Notes:", ""]
        for note, where in notes.items():
            lines.append(f"- {note}: {describe(where)}")
    return "\n".join(lines) + "\n"


def plot(cases, path):
    try:
        import matplotlib
    except ImportError:
        print(f"no plot: this python ({sys.executable}) has no matplotlib")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # One row of bars per pass and size.
    rows = [(p, size) for p in PASSES for size in ORDER["size"]
            if any(pass_of(c) == p[0] and c[3] == size for c in cases)]
    groups = [sorted((c for c in cases if pass_of(c) == name and c[3] == size), key=case_key)
              for (name, _, _), size in rows]
    fig, axes = plt.subplots(len(rows), 1, squeeze=False,
                             figsize=(max(13, 0.6 * max(map(len, groups))), 3.6 * len(rows)))
    legend = {}
    for ax, ((name, _, counted), size), group in zip(axes[:, 0], rows, groups):
        # The row's implementations (hbn_unfused has epilogue cases only),
        # each in its own color in every row.
        impls = [i for i in IMPLS if any(i in cases[c] for c in group)]
        width = 0.8 / len(impls)
        missing = []
        for k, impl in enumerate(impls):
            xs = [i + (k - (len(impls) - 1) / 2) * width for i in range(len(group))]
            ys = [cases[c].get(impl, {}).get("gbps", 0) for c in group]
            legend[impl] = ax.bar(xs, ys, width, label=impl, color=f"C{IMPLS.index(impl)}")
            # n/a where it ran and failed or was unavailable; blank where it
            # has no such case.
            missing += [x for x, c, y in zip(xs, group, ys) if impl in cases[c] and not y]
        if size == "tiny":  # per-call overhead: values span orders of magnitude
            ax.set_yscale("log")
        for x in missing:
            ax.text(x, ax.get_ylim()[0], "n/a", rotation=90, ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(group)))
        # The mode without "backward_" (the title says which pass), its
        # epilogue if any, and dtype/layout: a line each, so that the labels
        # fit.
        ax.set_xticklabels([plain_case(c)[0].replace("backward_", "", 1) +
                            (f"\n+{epilogue_of(c)[1:]}" if epilogue_of(c) else "") +
                            "\n" + "/".join(c[1:3]) for c in group], fontsize=8)
        ax.set_ylabel("GB/s")
        ax.set_title(f"{name}, {size}" + (" (log scale)" if size == "tiny" else "") +
                     f": GB/s of {counted}" +
                     ("; with an epilogue, of its tensors too" if any(map(epilogue_of, group))
                      else ""), fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.legend(list(legend.values()), list(legend), loc="upper center", ncol=len(legend))
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def schedule_markdown(paths):
    """Table of hbn's time per case (rows) and schedule source (columns)."""
    sources, times, contexts = [], defaultdict(dict), []
    for path in paths:
        context, cases = load(path)
        source = context.get("hbn_schedule", Path(path).stem)
        sources.append(source)
        contexts.append(context)
        for case, r in cases.items():
            times[case][source] = r.get("hbn")
    context = contexts[0]
    lines = [
        "# hbn by schedule source",
        "",
        f"CPU: {cpu_model()} ({context.get('num_cpus', '?')} CPUs); "
        f"date: {context.get('date', 'unknown date')}; hbn_source={context.get('hbn_source', '?')}. "
        "Median hbn time; in brackets, time over the manual schedule's (below 1: faster).",
        "",
        "| case | " + " | ".join(sources) + " |",
        "|---|" + "---:|" * len(sources),
    ]
    for case in sorted(times, key=case_key):
        manual = times[case].get("manual")
        cells = []
        for source in sources:
            r = times[case].get(source)
            if not r or "seconds" not in r:
                cells.append(fmt_gbps(r))
            elif source == "manual" or not manual or "seconds" not in manual:
                cells.append(fmt_time(r["seconds"]))
            else:
                cells.append(f"{fmt_time(r['seconds'])} ({r['seconds'] / manual['seconds']:.2f})")
        lines.append("| " + "/".join(case) + " | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("json", nargs="+")
    parser.add_argument("--schedules", action="store_true",
                        help="one JSON per schedule source: compare them")
    parser.add_argument("--md", help="markdown output (default: JSON path with .md)")
    parser.add_argument("--png", help="plot output (default: JSON path with .png)")
    args = parser.parse_args()

    if args.schedules:
        md = schedule_markdown(args.json)
        print(md, end="")
        if args.md:
            Path(args.md).write_text(md)
            print(f"\nwrote {args.md}")
        return
    if len(args.json) > 1:
        parser.error("one RESULTS.json, or --schedules")
    args.json = args.json[0]
    context, cases = load(args.json)
    if not cases:
        raise SystemExit(f"{args.json}: no BM/... benchmarks")
    md = markdown(context, cases)
    print(md, end="")
    md_path = Path(args.md or Path(args.json).with_suffix(".md"))
    png_path = Path(args.png or Path(args.json).with_suffix(".png"))
    md_path.write_text(md)
    print(f"\nwrote {md_path}")
    if plot(cases, png_path):
        print(f"wrote {png_path}")


if __name__ == "__main__":
    main()
