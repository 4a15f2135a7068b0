"""Draw where a p2p_bench run's time went: a lane per device, and every device's bytes over time.

    python3 benchmarks/p2p_bench.py --plot timeline.png        # draws as it measures
    python3 benchmarks/p2p_bench.py --json > run.json
    python3 benchmarks/p2p_plot.py run.json timeline.png       # draws a run measured earlier

Top: one lane per device, latest to finish at the top. Each stretch is coloured by where most of its
bytes came from (origin, a peer on the device's LAN, a peer behind another NAT); grey hatching is
a stretch of 2 s or more in which the device received nothing; x is a node restart, | a dial of the
origin, a dot the device's done report. Dashed: the swarming bound; dotted: HTTP's fleet time.
Bottom: each device's bytes received, the artifact's size as a line (above it: duplicates).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.swarm_timeline import DELIVERY_BYTES  # noqa: E402

COLOURS = {"origin": "#d62728", "lan": "#2ca02c", "across": "#1f77b4", "idle": "#bdbdbd"}
LABELS = {"origin": "from the origin", "lan": "from a LAN peer", "across": "from a peer across NATs",
          "idle": "idle (nothing received)"}


def segments(samples: list[list[float]], until: float | None) -> dict[str, list[tuple[float, float]]]:
    """(start, width) stretches per source: each interval between samples goes to the source that
    delivered most in it; touching stretches of one source merge."""
    spans: dict[str, list[tuple[float, float]]] = {"origin": [], "lan": [], "across": []}
    previous = [0.0, 0, 0, 0]
    for sample in samples:
        if until is not None and previous[0] >= until:
            break
        gains = {source: sample[i] - previous[i] for i, source in enumerate(("origin", "lan", "across"), 1)}
        source = max(gains, key=gains.__getitem__)
        if sum(gains.values()) >= DELIVERY_BYTES:  # less is the connections' own chatter, not content
            start, width = previous[0], sample[0] - previous[0]
            runs = spans[source]
            if runs and abs(runs[-1][0] + runs[-1][1] - start) < 1e-6:
                runs[-1] = (runs[-1][0], runs[-1][1] + width)
            else:
                runs.append((start, width))
        previous = sample
    return spans


def plot_run(figures: dict, path: Path, title: str = "") -> None:
    """Write `figures` (one run of p2p_bench's JSON, with its `timeline`) as a PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")  # no display: CI and ssh sessions
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    timeline = figures["timeline"]
    if not timeline:
        raise ValueError("this run has no timeline (measured with sampling off?)")
    horizon = max(figures.get("fleet_seconds_p2p") or 0, max(t["samples"][-1][0] for t in timeline.values() if t["samples"]))
    order = sorted(timeline, key=lambda d: timeline[d]["done"] if timeline[d]["done"] is not None else horizon * 2)
    mib = 1 << 20
    figure, (lanes, curves) = plt.subplots(
        2, 1, sharex=True, figsize=(12, 4 + 0.32 * len(order)),
        gridspec_kw={"height_ratios": [max(len(order) * 0.32, 2), 3]})
    for row, device in enumerate(order):
        t = timeline[device]
        for source, spans in segments(t["samples"], t["done"]).items():
            lanes.broken_barh(spans, (row - 0.35, 0.7), color=COLOURS[source])
        idle = [(start, end - start) for start, end in t["idle"]]
        lanes.broken_barh(idle, (row - 0.35, 0.7), facecolor=COLOURS["idle"], hatch="//", edgecolor="white")
        lanes.plot(t["restarts"], [row] * len(t["restarts"]), "kx", markersize=7)
        lanes.plot(t["origin_dials"], [row] * len(t["origin_dials"]), "|", color=COLOURS["origin"], markersize=12)
        if t["done"] is not None:
            lanes.plot([t["done"]], [row], "ko", markersize=4)
        if t["samples"]:
            line, = curves.plot([s[0] for s in t["samples"]], [sum(s[1:]) / mib for s in t["samples"]], linewidth=0.9)
            curves.annotate(device, (t["samples"][-1][0], sum(t["samples"][-1][1:]) / mib), fontsize=7,
                            color=line.get_color(), xytext=(2, 0), textcoords="offset points", va="center")
    lanes.set_yticks(range(len(order)), [f"{d} ({timeline[d]['nat']})" for d in order], fontsize=8)
    lanes.set_ylim(-0.7, len(order) - 0.3)
    for axis in (lanes, curves):
        if figures.get("bound_seconds"):
            axis.axvline(figures["bound_seconds"], color="black", linestyle="--", linewidth=0.8)
        if figures.get("fleet_seconds_http"):
            axis.axvline(figures["fleet_seconds_http"], color="black", linestyle=":", linewidth=0.8)
    curves.axhline(figures["artifact_bytes"] / mib, color="black", linewidth=0.8)
    curves.set_ylabel("MiB received")
    curves.set_xlabel("seconds since the release")
    curves.set_xlim(0, horizon * 1.02)
    lanes.legend(handles=[Patch(color=COLOURS[k], label=LABELS[k]) for k in COLOURS], loc="lower right", fontsize=8)
    summary = (f"fleet {figures.get('fleet_seconds_p2p')} s = {figures.get('fleet_x_bound')}x bound "
               f"({figures.get('bound_seconds')} s), {figures.get('fleet_time_ratio')} of HTTP; "
               f"received {figures.get('duplicate_x_artifact')}x the artifact; "
               f"{figures.get('cpu_seconds_per_mb')} CPU s/MiB; {figures.get('node_restarts')} restarts")
    lanes.set_title(f"{title}\n{summary}" if title else summary, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    data = json.loads(Path(sys.argv[1]).read_text())
    runs = data["runs"] if "runs" in data else [data]
    out = Path(sys.argv[2])
    for index, figures in enumerate(runs, 1):
        target = out if len(runs) == 1 else out.with_name(f"{out.stem}-{index}{out.suffix}")
        plot_run(figures, target, f"run {index}" if len(runs) > 1 else "")
        print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
