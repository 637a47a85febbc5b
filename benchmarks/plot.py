"""Chart of fastperc's speedups per op from a results JSON of ``fastperc bench``.

    python benchmarks/plot.py RESULTS.json OUT.png

One bar group per (op, shape, dtype, mode): the best fastperc backend's speedup over eager
torch and over torch.compile (where measured). The title names the device and the date.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def speedups(report: dict) -> list[tuple[str, float | None, float | None]]:
    """(label, x eager, x compile) per (op, shape, layout, dtype, mode) that fastperc ran."""
    from fastperc.bench.report import comparisons

    return [(f"{c.op} {'x'.join(map(str, c.shape))} {c.layout} {c.dtype} {c.mode}",
             c.speedup("eager"), c.speedup("compile"))
            for c in comparisons(report) if c.best is not None]


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = speedups(report)
    fig, ax = plt.subplots(figsize=(10, 0.28 * len(rows) + 1.5))
    ys = range(len(rows))
    ax.barh([y - 0.2 for y in ys], [r[1] or 0 for r in rows], height=0.4, label="over eager")
    ax.barh([y + 0.2 for y in ys], [r[2] or 0 for r in rows], height=0.4, label="over torch.compile")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(list(ys), [r[0] for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speedup of fastperc's best backend (higher is better)")
    ax.set_title(f"fastperc on {report['device']}, {report['date'][:10]}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    plot(json.loads(Path(argv[0]).read_text()), Path(argv[1]))
    print(f"chart written to {argv[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
