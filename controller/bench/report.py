"""``kpr bench`` output: the terminal table (rich), the JSON, the PNG plots
(matplotlib, Agg) and docs/benchmarks.md, all from one run's summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from controller.bench.harness import Run, summarize

TARGETS_EBPF = (
    ("p50 at the largest scale within 10% of the floor", "x_floor_p50", 1.10),
)


def _f(x: Any, fmt: str = "{:.1f}") -> str:
    return "–" if x is None else fmt.format(x)


def _bpf(s: dict[str, Any]) -> str:
    """new flow / established (the program's own cost when measured) /
    live-traffic mean, ns per run."""
    if s.get("bpf_ns_per_run") is None:
        return ""
    est = "bpf_established_own_ns" if s.get("bpf_established_own_ns") else \
        "bpf_established_ns"
    return " / ".join(_f(s.get(k), "{:.0f}") for k in (
        "bpf_new_flow_ns", est, "bpf_ns_per_run"))


def rows(summary: dict[str, Any]) -> list[list[str]]:
    out = []
    for n, row in summary.items():
        fl = row["floor"]
        out.append([f"{int(n):,}", "floor (direct, no datapath)", "", "", "", "", "",
                    _f(fl["p50"]), _f(fl["p99"]), _f(fl["rate"], "{:.0f}"), "", "",
                    _f(fl.get("x_ref_p50"), "{:.3f}"), "", "", ""])
        for mode, s in row.items():
            if mode == "floor":
                continue
            if "error" in s:
                msg = s["error"].splitlines()[-1] if s["error"] else "?"
                out.append([f"{int(n):,}", mode, msg if msg.startswith("skipped")
                            else "error: " + msg[:100]] + [""] * 13)
                continue
            out.append([f"{int(n):,}", mode, _f(s["full_sync_s"], "{:.2f}"),
                        _f(s["change_p50_ms"]), _f(s["change_p99_ms"]),
                        _f(s["change_to_traffic_ms"]), _f(s["peak_rss_mb"], "{:.0f}"),
                        _f(s["tail_p50"]), _f(s["tail_p99"]), _f(s["tail_rate"], "{:.0f}"),
                        _f(s["x_floor_p50"], "{:.3f}"), _f(s.get("x_floor_p99"), "{:.3f}"),
                        _f(s.get("x_ref_p50"), "{:.3f}"), _f(s["x_iptables_p50"], "{:.2f}"),
                        _f(s.get("others_x_p50"), "{:.3f}"), _bpf(s)])
    return out


HEADER = ["Services", "datapath", "full sync s", "1 change p50 ms", "1 change p99 ms",
          "change→traffic ms", "peak RSS MB", "conn p50 µs", "conn p99 µs", "conn/s",
          "p50 ×floor", "p99 ×floor", "p50 ×ref", "×ref vs iptables",
          "other traffic ×", "BPF ns: new / est. own / live"]


def print_table(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="kpr bench (medians over rounds; latency: new connections to the tail "
              "Service; ×floor: to the floor measured beside it)")
    for h in HEADER:
        t.add_column(h, justify="left" if h == "datapath" else "right")
    for r in rows(summary):
        t.add_row(*r)
    import sys

    # a pipe or a CI log is not 80 columns of terminal: do not fold the figures
    Console(width=None if sys.stdout.isatty() else 200).print(t)


def markdown_table(summary: dict[str, Any]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in rows(summary)]
    return "\n".join(lines)


def plots(summary: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = [int(n) for n in summary]
    modes = list(dict.fromkeys(m for row in summary.values() for m in row if m != "floor"))
    paths = []
    for name, key, ylabel, extra in (
            ("bench-latency.png", "tail_p50", "new-connection latency p50 (µs)", "floor"),
            ("bench-latency-p99.png", "tail_p99", "new-connection latency p99 (µs)", "floor"),
            ("bench-latency-ratio.png", "x_floor_p50",
             "p50 / p50 of the floor measured beside it", "ratio"),
            ("bench-programming.png", "full_sync_s", "full programming time (s)", "log"),
            ("bench-change.png", "change_p99_ms", "one Service change p99 (ms)", "log")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for m in modes:
            xs = [n for n in scales if "error" not in summary[str(n)].get(m, {"error": 1})
                  and summary[str(n)][m].get(key) is not None]
            ys = [summary[str(n)][m][key] for n in xs]
            if xs:
                ax.plot(xs, ys, marker="o", label=m)
        if extra == "floor":
            ax.plot(scales, [summary[str(n)]["floor"][key.split("_")[1]] for n in scales],
                    linestyle="--", color="grey", label="floor (direct, no datapath)")
        elif extra == "ratio":
            ax.axhline(1.0, linestyle="--", color="grey", label="floor")
        else:
            ax.set_yscale("log")
        ax.set_xscale("log")
        ax.set_xlabel("Services")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def ebpf_targets(summary: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """The issue's targets for the eBPF datapath: (target, measured, met)."""
    scales = sorted(int(n) for n in summary)
    lo, hi = str(scales[0]), str(scales[-1])
    e_hi = summary[hi].get("ebpf", {"error": "not run"})
    e_lo = summary[lo].get("ebpf", {"error": "not run"})
    if "error" in e_hi or "error" in e_lo:
        return [("eBPF datapath", "not measured", None)]
    out: list[tuple[str, str, bool | None]] = []

    def x_floor(s: dict[str, Any], k: str) -> float:
        """Ratio to the floor measured beside it (summarize() fills it)."""
        return float(s[f"x_floor_{k}"])
    fl = e_hi.get("floor_p50") or summary[hi]["floor"]["p50"]
    out.append((f"p50 at {int(hi):,} within 10% of the floor",
                f"×{x_floor(e_hi, 'p50'):.3f} (median over rounds of each round's ratio; "
                f"medians: {e_hi['tail_p50']:.1f} µs vs {fl:.1f} µs). To the reference "
                f"through the twin node with nothing installed: ×{e_hi['x_ref_p50']:.3f}, "
                f"of which ×{e_hi['others_x_p50']:.3f} is the floor's own (what the "
                "installed datapath, with Service traffic beside, costs a connection that is "
                "not to a Service; not yet explained: see the README)",
                x_floor(e_hi, "p50") <= 1.10))
    for k, limit in (("p50", 1.05), ("p99", 1.10)):
        norm = x_floor(e_hi, k) / x_floor(e_lo, k)
        out.append((f"{k} at {int(hi):,} within {round((limit - 1) * 100)}% of {k} at "
                    f"{int(lo):,}",
                    f"×{norm:.3f} through the floors (×{x_floor(e_hi, k):.3f} at "
                    f"{int(hi):,}, ×{x_floor(e_lo, k):.3f} at {int(lo):,}); the absolute "
                    f"medians, measured minutes apart: {e_hi[f'tail_{k}']:.1f} vs "
                    f"{e_lo[f'tail_{k}']:.1f} µs (×{e_hi[f'tail_{k}'] / e_lo[f'tail_{k}']:.3f})",
                    norm <= limit))
    for other in ("nftables", "iptables"):
        both = [n for n in summary if other in summary[n] and "error" not in summary[n][other]
                and "ebpf" in summary[n] and "error" not in summary[n]["ebpf"]]
        rel = {n: summary[n]["ebpf"]["x_ref_p50"] / summary[n][other]["x_ref_p50"]
               for n in both}
        ratios = ", ".join(f"{int(n):,}: ×{r:.2f}" for n, r in rel.items())
        out.append((f"p50 at or below {other} at every scale (ratios to the reference "
                    "compared)",
                    ratios or "not measured",
                    None if not ratios else all(r <= 1.0 for r in rel.values())))
    out.append((f"full programming at {int(hi):,} ≤ 2 s",
                f"{e_hi['full_sync_s']:.2f} s", e_hi["full_sync_s"] <= 2.0))
    out.append((f"one change at {int(hi):,} ≤ 10 ms p99",
                f"{e_hi['change_p99_ms']:.2f} ms", e_hi["change_p99_ms"] <= 10.0))
    build = e_hi.get("build_peak_rss_mb")
    out.append((f"controller peak RSS at {int(hi):,} ≤ 250 MB",
                f"{e_hi['peak_rss_mb']:.0f} MB" + (
                    f" (the compile child, bcc + LLVM, peaks at {build:.0f} MB before the "
                    "controller holds any Service, and exits)" if build else ""),
                e_hi["peak_rss_mb"] <= 250))
    if e_hi.get("bpf_established_ns") is not None:
        own = e_hi.get("bpf_established_own_ns")
        est = e_hi["bpf_established_ns"]
        if own is None:  # results from before the loop was measured
            judged, how = est, ""
            detail = f"established {est:.0f} ns, reply {e_hi['bpf_reply_ns']:.0f} ns"
        else:
            judged = own
            how = (": its test run less the test run's own loop, an empty program timed "
                   "the same way, each the fastest of 15 batches")
            detail = (f"established {own:.0f} ns (test run {est:.0f} ns, loop "
                      f"{e_hi['bpf_test_run_loop_ns']:.0f} ns; batches' median "
                      f"{e_hi.get('bpf_established_median_ns', est):.0f} ns), reply "
                      f"{e_hi['bpf_reply_own_ns']:.0f} ns")
        single = e_hi.get("bpf_established_single_run_ns")
        out.append((f"BPF program ≤ 150 ns per packet at {int(hi):,} (judged on an "
                    f"established flow's packet, BPF_PROG_TEST_RUN{how})",
                    detail + f"; new flow {e_hi['bpf_new_flow_ns']:.0f} ns timed one run "
                    "per call" + (f", where an established packet timed the same way takes "
                                  f"{single:.0f} ns" if single else "")
                    + f"; live traffic with bpf_stats {e_hi['bpf_ns_per_run']:.0f} ns",
                    judged <= 150))
    return out


def write(r: Run, out: Path, json_path: Path | None = None) -> dict[str, Any]:
    """JSON, plots and docs/benchmarks.md; returns the summary."""
    out.mkdir(parents=True, exist_ok=True)
    path = json_path or out / "benchmarks.json"
    doc: dict[str, Any] = {"command": r.command, "machine": r.machine, "config": r.config,
                           "skipped": r.skipped, "floors": r.floors, "results": r.results}
    path.write_text(json.dumps(doc, indent=1) + "\n")  # the raw results first, always
    summary = summarize(r)
    doc["summary"] = summary
    path.write_text(json.dumps(doc, indent=1) + "\n")
    pngs = plots(summary, out)
    m = r.machine
    targets = ebpf_targets(summary)
    md = [
        "# kpr bench: results",
        "",
        f"Command: `{r.command}` (rounds: {r.config['repeats']}, new connections per "
        f"target and round: {r.config['connections']:,}, endpoints per Service: "
        f"{r.config['endpoints']}).",
        "",
        f"Machine: {m['cpu']}, {m['cpus']} CPUs, {m['memory_gb']} GB, kernel {m['kernel']}, "
        f"BPF JIT {'on' if m['bpf_jit'] else 'OFF'}, {m['nft']}, {m['iptables']}, "
        f"Python {m['python']}.",
        "",
        "Medians over rounds; datapaths interleaved within each round. Latency is one new "
        "TCP connection (connect, HTTP/1.0 request, response, close; a fresh source port "
        "each) to the tail Service of the generated order, from a client pod through the "
        "node to an nginx pod. Each measurement interleaves, ten connections at a time, "
        "the three Services with two paths beside them: the floor, straight to a twin "
        "nginx pod through the same node (with the datapath installed), and the "
        "reference, to a third nginx pod through a twin node that no datapath touches. "
        "×floor is the median over rounds of each measurement's ratio to its floor (the "
        "target's floor); ×ref the same to its reference, and datapaths compare through "
        "it (×ref vs iptables); other traffic × is the floor over the reference: what the "
        "datapath, with Service traffic beside, costs the node's connections that are not "
        "to a Service (not yet explained: see the README). Figures taken "
        "minutes apart are not compared: this host's speed changes for minutes at a time, "
        "by up to ×1.3 with nothing changed. The floor row is measured once per round "
        "with no datapath installed; its ×ref is the twin path's calibration.",
        "",
        markdown_table(summary),
        "",
    ]
    if r.skipped:
        md += ["Not measured here: " + "; ".join(f"{k} ({v})" for k, v in r.skipped.items())
               + ".", ""]
    md += ["## eBPF targets", "", "| target | measured | met |", "|---|---|---|"]
    md += [f"| {t} | {v} | {'–' if ok is None else ('yes' if ok else 'no')} |"
           for t, v, ok in targets]
    md += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in pngs] + [""]
    (out / "benchmarks.md").write_text("\n".join(md))
    return summary
