"""Summaries, the stdout tables and the PNG chart of the benchmark suite."""
import statistics

from benchmarks.workloads import LIBS, REFERENCES

SHORT = {"joblib-threading": "joblib-thr", "ProcessPool": "ProcPool", "sequential": "seq loop"}


def summarize(runs, plan):
    """Per workload and library: raw times, median time, median peak PSS/RSS, status."""
    out = {}
    for w, libs in plan.items():
        out[w] = {}
        for lib in libs:
            rs = [r for r in runs if r["workload"] == w and r["lib"] == lib]
            ok = [r for r in rs if r["status"] == "ok"]
            bad = [r["status"] for r in rs if r["status"] != "ok"]
            med = (lambda k, src=ok: statistics.median(r[k] for r in src) if src else None)
            out[w][lib] = {
                "status": bad[0] if bad else "ok", "n_ok": len(ok), "n": len(rs),
                "times_s": [r["time_s"] for r in rs],
                "median_s": med("time_s"), "min_s": min((r["time_s"] for r in ok), default=None),
                "median_process_s": med("process_s"),
                "pss_peak_mb": med("pss_peak_mb", rs), "rss_peak_mb": med("rss_peak_mb", rs),
                "shm_peak_mb": med("shm_peak_mb", rs),
                "pss_plus_unmapped_shm_peak_mb": med("pss_plus_unmapped_shm_peak_mb", rs),
                "pss_peaks_mb": [r["pss_peak_mb"] for r in rs]}
    return out


def best_peer(row):
    """(lib, median) of the fastest library other than parmap and the references."""
    peers = [(v["median_s"], lib) for lib, v in row.items()
             if lib != "parmap" and lib not in REFERENCES and v["status"] == "ok"]
    if not peers:
        return None, None
    t, lib = min(peers)
    return lib, t


def _columns(plan):
    used = {lib for libs in plan.values() for lib in libs}
    return [lib for lib in LIBS if lib in used]


def _cell(v, fmt):
    if v is None:
        return "-"
    if v["status"] != "ok":
        return v["status"].split()[0][:9]
    return fmt(v)


def tables(summary, plan, extra):
    cols = _columns(plan)
    head = f"{'workload':<22}" + "".join(f"{SHORT.get(c, c):>11}" for c in cols)
    lines = ["Median wall time, s (n_jobs=2; * = best peer)",
             head + f"{'parmap/best':>13}"]
    for w in plan:
        row = summary[w]
        bl, bt = best_peer(row)
        cells = ""
        for c in cols:
            mark = "*" if c == bl else " "
            txt = _cell(row.get(c), lambda v: f"{v['median_s']:.3f}{mark}")
            cells += f"{txt:>11}"
        p = row.get("parmap")
        ratio = (f"{p['median_s'] / bt:.2f}x" if p and p["status"] == "ok" and bt else "-")
        lines.append(f"{w:<22}{cells}{ratio:>13}")

    peers = [c for c in cols if c != "parmap"]
    lines += ["", "Ratio parmap / peer (below 1: parmap faster)",
              f"{'workload':<22}" + "".join(f"{SHORT.get(c, c):>11}" for c in peers)]
    for w in plan:
        row, cells = summary[w], ""
        p = row.get("parmap")
        for c in peers:
            v = row.get(c)
            ok = p and v and p["status"] == "ok" and v["status"] == "ok"
            txt = f"{p['median_s'] / v['median_s']:.2f}" if ok else "-"
            cells += f"{txt:>11}"
        lines.append(f"{w:<22}{cells}")

    lines += ["", "Peak PSS of the whole process tree, MB (median of reps)", head]
    for w in plan:
        row = summary[w]
        txt = ["-" if row.get(c) is None else f"{row[c]['pss_peak_mb']:.0f}" for c in cols]
        lines.append(f"{w:<22}" + "".join(f"{t:>11}" for t in txt))

    notes = []
    for w, ex in extra.items():
        got = summary.get(w, {}).get("parmap", {}).get("median_s")
        if "ideal_s" in ex and got:
            notes.append(f"{w}: ideal (tasks x single-task time / 2) = {ex['ideal_s']:.3f} s; "
                         f"parmap reaches {ex['ideal_s'] / got:.0%} of the ideal speed-up")
        if "array_mb" in ex:
            mb, row = ex["array_mb"], summary.get(w, {})
            ratios = ", ".join(f"{c} {row[c]['pss_peak_mb'] / mb:.1f}x" for c in cols if c in row)
            notes.append(f"{w}: the array is {mb:.0f} MB; peak PSS / array: {ratios}")
    for w in plan:  # against the plain loop (the n_jobs=1 row's target)
        row = summary[w]
        seq, p = row.get("sequential"), row.get("parmap")
        if seq and p and seq["median_s"] and p["median_s"]:
            others = "".join(f", {c} {row[c]['median_s'] / seq['median_s']:.1f}x" for c in cols
                             if c not in ("parmap", "sequential") and c in row
                             and row[c]["median_s"])
            notes.append(f"{w}: time / plain loop: parmap {p['median_s'] / seq['median_s']:.2f}x"
                         + others)
    for w in plan:  # memory held in /dev/shm files that no process maps is not in PSS
        row = summary[w]
        fix = {c: row[c].get("pss_plus_unmapped_shm_peak_mb") for c in cols if c in row}
        if any(v and v > 1.05 * row[c]["pss_peak_mb"] + 5 for c, v in fix.items()):
            notes.append(f"{w}: PSS + unmapped /dev/shm growth, MB: " + ", ".join(
                f"{c} {v:.0f}" for c, v in fix.items() if v is not None))
    if notes:
        lines += [""] + notes
    return "\n".join(lines)


def chart(summary, plan, extra, info, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ws = list(plan)
    ncol = min(4, len(ws))
    nrow = -(-len(ws) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.4 * nrow), squeeze=False)
    for ax, w in zip(axes.flat, ws):
        row = summary[w]
        libs = [c for c in plan[w] if row[c]["status"] == "ok"]
        bl, bt = best_peer(row)
        ts = [row[c]["median_s"] for c in libs]
        colors = ["#d62728" if c == "parmap" else "#999999" if c in REFERENCES
                  else "#1f77b4" if c == bl else "#aec7e8" for c in libs]
        bars = ax.bar(range(len(libs)), ts, color=colors)
        for b, t in zip(bars, ts):
            ax.annotate(f"{t:.2f}", (b.get_x() + b.get_width() / 2, t), ha="center",
                        va="bottom", fontsize=7)
        if "ideal_s" in extra.get(w, {}):
            ax.axhline(extra[w]["ideal_s"], color="k", ls="--", lw=0.8)
            ax.annotate("ideal", (len(libs) - 0.5, extra[w]["ideal_s"]), ha="right",
                        va="bottom", fontsize=7)
        ax.set_xticks(range(len(libs)))
        ax.set_xticklabels([SHORT.get(c, c) for c in libs], rotation=35, ha="right", fontsize=8)
        p = row.get("parmap")
        sub = f" — parmap/best {p['median_s'] / bt:.2f}x" if p and p["median_s"] and bt else ""
        ax.set_title(w + sub, fontsize=9)
        log = len(ts) > 1 and max(ts) > 20 * min(ts)
        if log:
            ax.set_yscale("log")
            ax.set_ylim(min(ts) / 3, max(ts) * 2)
        ax.set_ylabel("median s" + (" (log scale)" if log else ""), fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
        if not log:
            ax.margins(y=0.15)
    for ax in list(axes.flat)[len(ws):]:
        ax.axis("off")
    fig.suptitle(f"parmap vs peers, n_jobs=2, {info['cpu_count']} × {info['cpu_model']}, "
                 f"Python {info['python']} (red: parmap, dark blue: best peer)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()))  # room for the title
    fig.savefig(path, dpi=110)
    plt.close(fig)
