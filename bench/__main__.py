"""``python -m bench``: softjax beside its peers, measured in one process.

Each op family is a module of this package with ``run(args) -> list[dict]``; rows share the
columns below. Times are medians of interleaved runs after warm-up (ratios, not absolute
figures, are what carry across machines), memory is XLA's compiled temp size, errors are
against a float64 reference.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time

import jax

# Op families, in the order they are run; each is ``bench/<name>.py``.
MODULES = ["softmax_family", "losses", "vocab", "attention", "sampling"]

COLUMNS = [
    ("family", 10),
    ("op", 26),
    ("case", 22),
    ("dtype", 8),
    ("peer", 22),
    ("time_ratio", 10),
    ("softjax_ms", 10),
    ("peer_ms", 9),
    ("softjax_MiB", 11),
    ("peer_MiB", 9),
    ("softjax_err", 11),
    ("peer_err", 9),
]


def format_table(rows: list[dict]) -> str:
    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"
        return str(v)

    lines = [" ".join(name.ljust(width) for name, width in COLUMNS)]
    for r in rows:
        lines.append(" ".join(cell(r.get(name)).ljust(width) for name, width in COLUMNS))
    return "\n".join(lines)


def machine() -> str:
    dev = jax.devices()[0]
    return (
        f"{platform.machine()} {platform.system()}, {jax.device_count()} x {dev.platform} "
        f"({dev.device_kind}), jax {jax.__version__}, python {platform.python_version()}"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke test")
    parser.add_argument("--large", action="store_true", help="add the largest sizes")
    parser.add_argument("--only", default=None, help=f"comma-separated subset of {MODULES}")
    parser.add_argument("--json", default=None, help="write all rows as JSON to this path")
    parser.add_argument("--out", default="bench_out", help="folder for plots (PNG)")
    parser.add_argument("--reps", type=int, default=None, help="timed runs per function")
    args = parser.parse_args(argv)
    names = MODULES if args.only is None else args.only.split(",")
    unknown = sorted(set(names) - set(MODULES))
    if unknown:
        parser.error(f"unknown --only {unknown}; choose from {MODULES}")
    print(f"# softjax bench on {machine()}", flush=True)
    all_rows = []
    for name in names:
        t0 = time.perf_counter()
        module = importlib.import_module(f"bench.{name}")
        rows = module.run(args)
        for r in rows:
            r.setdefault("family", name)
        print(f"\n## {name} ({time.perf_counter() - t0:.0f} s)\n{format_table(rows)}", flush=True)
        all_rows.extend(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "rows": all_rows}, f, indent=1)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
