"""pytest-benchmark results in, a markdown report and a PNG plot of speedups out.

    python -m benchmarks.report results.json [more.json | part.jsonl ...] \
        --md report.md --png speedups.png [--ceilings ceilings.json] [--summary]

Inputs: pytest-benchmark JSON files (``--benchmark-json``) and/or the JSON-lines files the suite
appends to as it goes (``$UNIFORMER_FAST_BENCH_JSONL``, one benchmark per line); a benchmark seen
in several inputs is counted once. Each group (one op at one shape) becomes a table whose rows are
its backends: time per call (the median), speedup over the group's baseline row, achieved GB/s
and TFLOP/s, the roofline floor and the fraction of it reached, peak memory, what actually ran.
``--summary`` prints a short table (best backend per group) to stdout, last.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import OrderedDict

LEVELS = ("op", "block", "model")


def load(paths) -> list:
    """Benchmark records (pytest-benchmark's dicts) from JSON and JSON-lines files, deduplicated
    by fullname (the last one read wins)."""
    out: "OrderedDict[str, dict]" = OrderedDict()
    for path in paths:
        with open(path) as f:
            text = f.read()
        if not text.strip():
            continue
        try:
            doc = json.loads(text)
            # pytest-benchmark's JSON, or a JSON-lines file of one line (a single record)
            records = (doc["benchmarks"] if "benchmarks" in doc else [doc]) if isinstance(doc, dict) else doc
        except json.JSONDecodeError:
            # JSON lines; a line cut off by a killed run is dropped.
            records = []
            for line in text.splitlines():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        for rec in records:
            out[rec.get("fullname") or rec["name"]] = rec
    return [row for rec in out.values() for row in expand(rec)]


def expand(rec) -> list:
    """A paired group (``extra_info["paired_rows"]``, benchmarks/harness.py: run_paired) as one
    record per row, each with the group's fields and its own; any other record as it is."""
    info = rec.get("extra_info", {})
    rows = info.get("paired_rows")
    if not rows:
        return [rec]
    common = {k: v for k, v in info.items() if k != "paired_rows"}
    name, full = rec.get("name", ""), rec.get("fullname") or rec.get("name", "")
    return [{"group": rec.get("group"), "name": f"{name}[{row['backend']}]", "fullname": f"{full}[{row['backend']}]",
             "stats": None, "extra_info": {**common, **row, "paired": True}} for row in rows]


def per_call(rec) -> "float | None":
    """Median seconds per call: the suite's own figure, else pytest-benchmark's median / calls."""
    info = rec.get("extra_info", {})
    if info.get("median_s"):
        return float(info["median_s"])
    stats = rec.get("stats") or {}
    if stats.get("median") is None:
        return None
    return float(stats["median"]) / int(info.get("calls_per_round", 1))


def groups(records) -> "OrderedDict[str, list]":
    """Records by group, groups sorted by level then name, rows in suite order (baseline first)."""
    by = OrderedDict()
    for rec in records:
        by.setdefault(rec.get("group") or rec["name"], []).append(rec)

    def level_key(item):
        info = item[1][0].get("extra_info", {})
        lvl = info.get("level", "op")
        return (LEVELS.index(lvl) if lvl in LEVELS else len(LEVELS), item[0])

    out = OrderedDict(sorted(by.items(), key=level_key))
    for name, rows in out.items():
        rows.sort(key=lambda r: not r.get("extra_info", {}).get("baseline", False))
    return out


def speedups(rows) -> dict:
    """backend -> baseline time / its time (None without a baseline row in the group)."""
    base = next((per_call(r) for r in rows if r.get("extra_info", {}).get("baseline")), None)
    out = {}
    for r in rows:
        t = per_call(r)
        paired = r["extra_info"].get("vs_baseline")  # rows timed alternated: the per-round ratio
        out[r["extra_info"].get("backend", r["name"])] = (paired["median"] if paired else
                                                          (base / t) if (base and t) else None)
    return out


def _fmt_time(s):
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def _fmt(v, spec, suffix=""):
    return "-" if v is None else f"{v:{spec}}{suffix}"


def _used(info):
    used = info.get("backend_used")
    if isinstance(used, dict):
        used = ", ".join(f"{k}={'/'.join(v) if isinstance(v, list) else v}" for k, v in used.items())
    kernels = info.get("kernels") or []
    if kernels:
        used = f"{used}; {'; '.join(k[:60] for k in kernels[:3])}"
    return str(used or "").replace("|", "/")


def markdown(records, *, ceilings=None, title="Benchmark report", env=None) -> str:
    lines = [f"# {title}", ""]
    first = records[0].get("extra_info", {}) if records else {}
    if env:
        lines += [f"- {k}: {v}" for k, v in env.items()]
    lines += [f"- device: {first.get('device', '?')}, dtype {first.get('dtype', '?')}, torch "
              f"{first.get('torch', '?')}", f"- timing: median per call; {first.get('l2', '')}", ""]
    if ceilings:
        lines += ["## Ceilings", "", "| ceiling | value |", "|---|---|"]
        for key, label, unit, scale in (("copy_bw", "copy bandwidth (read + write)", "TB/s", 1e12),
                                        ("matmul_bf16", "bf16 matmul", "TFLOP/s", 1e12),
                                        ("fp32", "FP32 CUDA cores", "TFLOP/s", 1e12),
                                        ("l2_bytes", "L2", "MB", 1e6)):
            if ceilings.get(key):
                lines.append(f"| {label} | {ceilings[key] / scale:.3g} {unit} |")
        if ceilings.get("source"):
            lines.append(f"| source | {ceilings['source']} |")
        lines.append("")
    lines += ["Speedup: over the group's baseline row (marked *). Floor: "
              "max(bytes / copy bandwidth, tensor-core FLOPs / matmul rate + CUDA-core FLOPs / FP32 rate), "
              "summed over passes (benchmarks/floors.py); % floor = floor / time.", ""]
    for name, rows in groups(records).items():
        if any(r.get("extra_info", {}).get("paired") for r in rows):
            lines += _paired_table(name, rows)
            continue
        sp = speedups(rows)
        lines += [f"### {name}", "",
                  "| backend | time | speedup | GB/s | TFLOP/s | floor | % floor | peak mem | ran |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            info = r.get("extra_info", {})
            backend = info.get("backend", r["name"])
            mark = "*" if info.get("baseline") else ""
            peak = info.get("peak_mem_bytes")
            lines.append(
                f"| {backend}{mark} | {_fmt_time(per_call(r))} | {_fmt(sp.get(backend), '.2f', 'x')} | "
                f"{_fmt(info.get('gbps'), '.1f')} | {_fmt(info.get('tflops'), '.2f')} | "
                f"{_fmt_time(info.get('floor_s'))} | "
                f"{_fmt(None if info.get('frac_floor') is None else 100 * info['frac_floor'], '.0f', '%')} | "
                f"{'-' if peak is None else f'{peak / 2**30:.2f} GiB'} | {_used(info)} |")
        lines.append("")
    return "\n".join(lines)


def _ratio(spread) -> str:
    if not spread:
        return "-"
    return f"{spread['median']:.2f}x ({spread['min']:.2f}-{spread['max']:.2f})"


def _paired_table(name, rows) -> list:
    """A group whose rows ran alternated: median time and range over the rounds, the per-round
    ratios to the baseline and to the rival row (median and range), the logits' error."""
    first = rows[0]["extra_info"]
    rival = first.get("rival_row")
    lines = [f"### {name}", "", f"Rows alternated in one process: {first.get('l2', '')}; ratios are per round "
             f"(median, range).", "",
             f"| backend | time | range | speedup | vs {rival or '-'} | logits err | GB/s | TFLOP/s | % floor | ran |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        info = r["extra_info"]
        mark = "*" if info.get("baseline") else ""
        if info.get("skipped"):
            lines.append(f"| {info['backend']}{mark} | - | - | - | - | - | - | - | - | skipped: "
                         f"{str(info['skipped']).replace('|', '/')} |")
            continue
        t = info.get("time") or {}
        err = info.get("logits_rel_err")
        lines.append(
            f"| {info['backend']}{mark} | {_fmt_time(per_call(r))} | "
            f"{_fmt_time(t.get('min'))} - {_fmt_time(t.get('max'))} | "
            f"{'1.00x' if info.get('baseline') else _ratio(info.get('vs_baseline'))} | "
            f"{'1.00x' if info['backend'] == rival else _ratio(info.get('vs_rival'))} | "
            f"{_fmt(err, '.1e')} | {_fmt(info.get('gbps'), '.1f')} | {_fmt(info.get('tflops'), '.2f')} | "
            f"{_fmt(None if info.get('frac_floor') is None else 100 * info['frac_floor'], '.0f', '%')} | "
            f"{_used(info)} |")
    lines.append("")
    return lines


def summary(records) -> str:
    """One line per group: baseline time, the fastest other backend, its speedup and % of floor."""
    rows_out = ["| group | baseline | best | time | speedup | % floor |", "|---|---|---|---|---|---|"]
    for name, rows in groups(records).items():
        sp = speedups(rows)
        base = next((r for r in rows if r.get("extra_info", {}).get("baseline")), None)
        others = [r for r in rows if r is not base and per_call(r)]
        best = min(others, key=per_call) if others else None
        info = best.get("extra_info", {}) if best else {}
        frac = info.get("frac_floor")
        rows_out.append(
            f"| {name.split(' | ')[0]} {name.split(' | ')[-1].split(':')[0]} | "
            f"{_fmt_time(per_call(base)) if base else '-'} | {info.get('backend', '-')} | "
            f"{_fmt_time(per_call(best)) if best else '-'} | "
            f"{_fmt(sp.get(info.get('backend')), '.2f', 'x')} | "
            f"{_fmt(None if frac is None else 100 * frac, '.0f', '%')} |")
    return "\n".join(rows_out)


def plot(records, path) -> bool:
    """Bar charts of speedup over the baseline per stage, one panel per op and pass. Returns
    False (and writes nothing) when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels: "OrderedDict[str, dict]" = OrderedDict()
    for name, rows in groups(records).items():
        series, _, where = name.partition(" | ")
        where = where.split(":")[0] or name
        first = rows[0].get("extra_info", {})
        if first.get("level") == "model":  # one panel per pass, the variants (and drop paths) side by side
            series, where = f"model {first.get('pass')} | {name.partition(' | ')[2]}", first.get("op")
            if first.get("pass") == "train" and first.get("drop_path_rate") is not None:
                where = f"{where} dp{round(first['drop_path_rate'], 3):g}"
        for backend, s in speedups(rows).items():
            info = next(r["extra_info"] for r in rows if r["extra_info"].get("backend") == backend)
            if s is None or info.get("baseline"):
                continue
            panels.setdefault(series, OrderedDict()).setdefault(where, {})[backend] = s
    if not panels:
        return False
    every = sorted({b for by_where in panels.values() for d in by_where.values() for b in d})
    colour = {b: f"C{i % 10}" for i, b in enumerate(every)}  # one colour per backend in every panel
    cols = min(3, len(panels))
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(5.5 * cols, 3.6 * nrows), squeeze=False)
    for ax, (series, by_where) in zip(axes.flat, panels.items()):
        wheres = list(by_where)
        backends = sorted({b for d in by_where.values() for b in d})
        width = 0.8 / max(1, len(backends))
        for i, b in enumerate(backends):
            xs = [j + (i - (len(backends) - 1) / 2) * width for j in range(len(wheres))]
            ax.bar(xs, [by_where[w].get(b, 0.0) for w in wheres], width, label=b, color=colour[b])
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(wheres)))
        ax.set_xticklabels(wheres, fontsize=7, rotation=15)
        ax.set_title(series, fontsize=8)
        ax.set_ylabel("speedup over baseline", fontsize=7)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("inputs", nargs="+", help="pytest-benchmark JSON or the suite's JSON-lines files")
    ap.add_argument("--md", help="write the markdown report here (default: stdout)")
    ap.add_argument("--png", help="write the speedup plot here")
    ap.add_argument("--ceilings", help="JSON of measured ceilings (benchmarks/ceilings.py)")
    ap.add_argument("--title", default="uniformer_fast benchmarks")
    ap.add_argument("--env", help="JSON file of environment facts (versions) for the header")
    ap.add_argument("--summary", action="store_true", help="print the short summary table last")
    args = ap.parse_args(argv)

    paths = [p for p in args.inputs if os.path.exists(p) and os.path.getsize(p) > 0]
    records = load(paths)
    if not records:
        print(f"report: no benchmark results in {args.inputs}", file=sys.stderr)
        return 1
    ceilings = env = None
    if args.ceilings and os.path.exists(args.ceilings):
        with open(args.ceilings) as f:
            ceilings = json.load(f)
    if args.env and os.path.exists(args.env):
        with open(args.env) as f:
            env = json.load(f)
    text = markdown(records, ceilings=ceilings, title=args.title, env=env)
    if args.png:
        if plot(records, args.png):
            text += f"\n![speedups per stage]({os.path.basename(args.png)})\n"
        else:
            print("report: matplotlib is not installed; no plot written", file=sys.stderr)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    if args.summary:
        print(summary(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
