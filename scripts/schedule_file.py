#!/usr/bin/env python3
"""Turns a .schedule.h that a Halide 14 autoscheduler emitted into a checked-in
schedule under autoschedules/ (see scripts/capture_schedules.sh).

    schedule_file.py RAW.schedule.h autoschedules/<source>/<class>/<library>.schedule.h
                     [--stages STAGES.schedule.h] [--serial]

- Function and include guard become apply_schedule_<source>_<class>_<library>
  (class with "_" for "-"), so that every checked-in schedule can live in one
  generator executable (see cmake/hbn_pipelines.cmake).
- Every tail strategy becomes GuardWithIf. The autoschedulers split with
  ShiftInwards (outputs) and RoundUp (intermediates) at factors taken from
  the 32x64x56x56 estimates: ShiftInwards reads and writes a shifted last
  block, so extents below a factor fail the bounds check, and in place
  (output aliasing input) the shifted tail recomputes from values it has
  already normalized; RoundUp needs its intermediates' extents rounded up,
  which is wrong for the per-channel outputs. GuardWithIf costs a guarded
  last block only.
- `Func f = pipeline.get_func(i);` becomes a lookup that checks the stage's
  name (hbn_schedules::stage in generators/checked_in_schedule.h): the
  schedule finds stages by index, so a changed algorithm must fail loudly.
- --serial drops parallel loops: the serial libraries exist to keep tiny
  tensors off the thread pool, and Li2018 parallelizes even for one core.
- Mullapudi2016 leaves a var it only reorders undeclared: declared by name.
- Li2018's output is not C++ as emitted (no Func or Var declarations, bare
  tail names) and schedules input wrappers (`bias_im`) that the pipeline does
  not hold: its Funcs are declared with the indices of another schedule of
  the same library (--stages, an Adams2019 one), its Vars by name (renamed
  out of Halide's own v<n>), its RVars from their stage, and the blocks of
  Funcs outside the pipeline are dropped.
"""
import argparse
import re
from pathlib import Path

GET_FUNC = re.compile(r"^(\s*)Func (\w+) = pipeline\.get_func\((\d+)\);$", re.M)


def stage_indices(text):
    return {name: int(index) for _, name, index in GET_FUNC.findall(text)}


def guard_tails(body):
    body = re.sub(r"TailStrategy::\w+", "TailStrategy::GuardWithIf", body)
    body = re.sub(r"(?<![\w:])(ShiftInwards|RoundUp|GuardWithIf)\b", "TailStrategy::GuardWithIf",
                  body)
    # Mullapudi2016 leaves the tail of most splits to TailStrategy::Auto.
    return re.sub(r"\.split\((\s*[\w$]+\s*,\s*[\w$]+\s*,\s*[\w$]+\s*,\s*\d+\s*)\)",
                  r".split(\1, TailStrategy::GuardWithIf)", body)


def declare_li2018(body, indices):
    """Declarations for Li2018's bare schedule statements."""
    # Li2018 names its loop variables v<n>, which is also how Halide names
    # the ones it makes itself (parallel(v, tasks) splits off a fresh Var).
    body = re.sub(r"\bv(\d+)\b", r"li_v\1", body)
    # Its GPU schedules can leave out the ';' that ends a statement.
    body = re.sub(r"(?<=[^;\n])\n(    \w)", r"\n    ;\n\1", body)
    blocks = re.findall(r"^    (\w+)((?: = (\w+))?(?:\.update\((\d*)\))?\s*\.[^;]*;)$", body,
                        re.M | re.S)
    kept, funcs, names, rvars, split_rvars = [], [], set(), {}, set()
    intermediates = {}  # rfactor's Funcs, and the stage they come from
    for func, statement, source, update in blocks:
        stage = intermediates.get(func, source or func)
        if stage not in indices:
            kept.append(f"    // {func}: not a stage of this pipeline (Li2018 schedules input "
                        f"wrappers), dropped.")
            continue
        if source:
            intermediates[func] = source
            kept.append(f"    Func {func}{statement}")
        else:
            if func not in funcs and func not in intermediates:
                funcs.append(func)
            kept.append(f"    {func}{statement}")
        for name in re.findall(r"[(,{]\s*([A-Za-z_][\w$]*)\s*(?=[,)}])", statement):
            # An RDom's dimensions (r9$x, numbered per generate() run, or a
            # named RDom's rest$x): take the stage's own, by position.
            rvar = re.fullmatch(r"[A-Za-z_]\w*\$([xyzw])", name)
            if rvar:
                rvars[name] = (f"{stage}.update({update or 0}).get_schedule().rvars()"
                               f"[{'xyzw'.index(rvar.group(1))}].var")
            else:
                names.add(name)
        # What a split or fuse of RVars makes is an RVar too.
        for op, args in re.findall(r"\.(split|fuse)\(([^()]*)\)", statement):
            args = [a.strip() for a in args.split(",")]
            if any(a in rvars or a in split_rvars for a in args[:1 if op == "split" else 2]):
                split_rvars.update(args[1:3] if op == "split" else args[2:3])
    names -= set(funcs) | set(intermediates) | split_rvars
    names -= {"ShiftInwards", "RoundUp", "GuardWithIf"}
    lines = [f"    Func {f} = pipeline.get_func({indices[f]});" for f in funcs]
    # Halide matches loop dimensions by name: `Var c("c")` is the pure var c.
    lines += [f"    Var {n}(\"{n}\");" for n in sorted(names)]
    lines += [f"    RVar {n}({accessor});" for n, accessor in sorted(rvars.items())]
    lines += [f"    RVar {n}(\"{n}\");" for n in sorted(split_rvars)]
    return "\n".join(lines + kept) + "\n"


def declare_reordered_vars(body):
    """Mullapudi2016 declares only the pure vars it splits (`Var c =
    f.args()[0];`): a var it only reorders is declared here,
    by name, which is how Halide matches loop dimensions."""
    declared = set(re.findall(r"\b(?:Var|RVar|Func) ([\w$]+)\b", body))
    used = set()
    for args in re.findall(r"\.reorder\(([^()]*)\)", body):
        used.update(a for a in re.split(r"[\s,{}]+", args) if re.fullmatch(r"[A-Za-z_][\w$]*", a))
    missing = sorted(used - declared)
    return "".join(f"    Var {n}(\"{n}\");\n" for n in missing) + body


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("raw")
    parser.add_argument("out", help="autoschedules/<source>/<class>/<library>.schedule.h")
    parser.add_argument("--stages", help="a schedule of the same library that names stages by index")
    parser.add_argument("--serial", action="store_true", help="drop parallel loops")
    args = parser.parse_args()

    text = Path(args.raw).read_text()
    head, sep, rest = text.partition("    using ::Halide::Var;\n")
    body, sep2, tail = rest.rpartition("\n}\n")
    if not sep or not sep2:
        raise SystemExit(f"{args.raw}: not a Halide 14 .schedule.h")
    if "pipeline.get_func(" not in body:
        if not args.stages:
            raise SystemExit(f"{args.raw}: no stage lookups; pass --stages")
        body = declare_li2018(body, stage_indices(Path(args.stages).read_text()))
    body = declare_reordered_vars(body)
    body = GET_FUNC.sub(r'\1Func \2 = hbn_schedules::stage(pipeline, \3, "\2", __FILE__);', body)
    body = guard_tails(body)
    if args.serial:
        body = re.sub(r"\s*\.parallel\([^()]*\)", "", body)

    out = Path(args.out)
    name = "_".join([out.parent.parent.name, out.parent.name.replace("-", "_"),
                     out.name.removesuffix(".schedule.h")])
    head = re.sub(r"\b\w+_SCHEDULE_H\b", f"{name}_SCHEDULE_H", head)
    head = re.sub(r"apply_schedule_\w+", f"apply_schedule_{name}", head)
    head = head.replace("// MACHINE GENERATED -- DO NOT EDIT\n",
                        "// MACHINE GENERATED -- DO NOT EDIT: scripts/capture_schedules.sh, with\n"
                        "// every tail strategy made GuardWithIf (scripts/schedule_file.py says why).\n")
    tail = re.sub(r"\b\w+_SCHEDULE_H\b", f"{name}_SCHEDULE_H", tail)
    Path(args.out).write_text(head + sep + body + sep2 + tail)


if __name__ == "__main__":
    main()
