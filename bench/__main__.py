"""``python -m bench``: softjax beside its peers, measured in one process.

Each op family is a module of this package with ``run(args) -> list[dict]``; rows share the
columns below. Times are medians of interleaved runs after warm-up (ratios, not absolute
figures, are what carry across machines), memory is XLA's compiled temp size, errors are
against a float64 reference.

The default run takes a few minutes on two CPU cores (sizes chosen to keep every family's
point: full-length rows, realistic vocabulary heads compiled, not run); ``--full`` runs the
sizes of the README's table (about 23 minutes there), ``--quick`` is a smoke test.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import pathlib
import platform
import sys
import time


def _quiet_missing_gpu() -> None:
    """On a machine without an NVIDIA driver where the CUDA plugin is installed (the
    ``accel`` extra, for compiling for an H200 from here), jax prints a long traceback
    before falling back to the CPU: say which platforms to use instead."""
    if "JAX_PLATFORMS" in os.environ or os.path.exists("/proc/driver/nvidia"):
        return
    if importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
        return
    tpu = any(os.path.exists(p) for p in ("/dev/accel0", "/dev/vfio/0"))
    os.environ["JAX_PLATFORMS"] = "tpu,cpu" if tpu else "cpu"


_quiet_missing_gpu()

import jax  # noqa: E402

from bench import harness  # noqa: E402

# Op families, in the order they are run; each is ``bench/<name>.py``.
MODULES = ["softmax_family", "losses", "vocab", "attention", "sampling"]

# Share of the run's time each family takes (measured), for the progress line's estimate.
WEIGHTS = {"softmax_family": 0.2, "losses": 0.3, "vocab": 0.25, "attention": 0.15, "sampling": 0.1}

COLUMNS = {
    "family": "op family (a module of bench/)",
    "op": "the softjax function",
    "case": "shape and what is measured (fwd, fwd+bwd, mem = compiled only)",
    "dtype": "input dtype",
    "peer": "what softjax is compared with",
    "time_ratio": "softjax time / peer time (median of interleaved runs; < 1: softjax faster)",
    "cpu_ratio": "softjax / peer process CPU time (every thread, resource.getrusage): the work",
    "softjax_ms": "softjax median time, ms",
    "peer_ms": "peer median time, ms",
    "softjax_MiB": "softjax compiled temp memory, MiB",
    "peer_MiB": "peer compiled temp memory, MiB",
    "softjax_HBM_GiB": "softjax HBM bytes read+written by the compiled kernels, GiB (targets)",
    "peer_HBM_GiB": "peer HBM bytes, GiB (compiled for a target: exact, nothing run)",
    "softjax_err": "softjax max error against float64 (ulp of the output dtype, or relative)",
    "peer_err": "peer max error against float64, same unit",
    "grad_err": "relative error of softjax's gradient against the exact one (an estimator's)",
}


def cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


# Widths the streamed rows are printed at (a longer cell pushes the rest of its line).
WIDTHS = {"family": 14, "op": 26, "case": 36, "dtype": 8, "peer": 18}


def format_line(cells: list[str]) -> str:
    """One streamed line: the named columns at their ``WIDTHS``, the numbers at 11."""
    return " ".join(
        c.ljust(WIDTHS.get(name, 11)) for name, c in zip(COLUMNS, cells, strict=True)
    ).rstrip()


def format_table(rows: list[dict], names: list[str] | None = None) -> str:
    """The rows under the shared columns (or ``names``), each as wide as its widest cell."""
    names = list(COLUMNS) if names is None else names
    cells = [[cell(r.get(name)) for name in names] for r in rows]
    widths = [max([len(n)] + [len(c[i]) for c in cells]) for i, n in enumerate(names)]
    lines = [" ".join(n.ljust(w) for n, w in zip(names, widths, strict=True)).rstrip()]
    for c in cells:
        lines.append(" ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)).rstrip())
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """One line: softjax against its peers over every row that measured the quantity."""
    ratios = [r["time_ratio"] for r in rows if isinstance(r.get("time_ratio"), float)]
    cpu = [r["cpu_ratio"] for r in rows if isinstance(r.get("cpu_ratio"), float)]
    mem = [r for r in rows if isinstance(r.get("softjax_MiB"), float) and r.get("peer_MiB")]
    err = [r for r in rows if isinstance(r.get("softjax_err"), float) and r.get("peer_err")]
    parts = []
    geomean = lambda xs: math.exp(sum(math.log(max(x, 1e-12)) for x in xs) / len(xs))  # noqa: E731
    if ratios:
        parts.append(f"time ratio geomean {geomean(ratios):.2f} over {len(ratios)} rows")
    if cpu:
        parts.append(f"CPU-time ratio geomean {geomean(cpu):.2f}")
    if mem:
        lean = sum(r["softjax_MiB"] <= r["peer_MiB"] for r in mem)
        parts.append(f"memory <= peer in {lean}/{len(mem)}")
    if err:
        exact = sum(r["softjax_err"] <= r["peer_err"] for r in err)
        parts.append(f"error <= peer in {exact}/{len(err)}")
    return "summary: softjax vs peer: " + ("; ".join(parts) if parts else "no rows")


def machine() -> str:
    dev = jax.devices()[0]
    return (
        f"{platform.machine()} {platform.system()}, {jax.device_count()} x {dev.platform} "
        f"({dev.device_kind}), jax {jax.__version__}, python {platform.python_version()}"
    )


def commit() -> str | None:
    """The checkout's commit (short hash), with ``+changes`` if tracked files differ from it;
    None outside a git checkout."""
    import subprocess

    here = pathlib.Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
        )
    except OSError:
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def parser() -> argparse.ArgumentParser:
    columns = "\n".join(f"  {name:<12} {text}" for name, text in COLUMNS.items())
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        epilog=f"columns:\n{columns}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="small sizes, a smoke test (~30 s)")
    p.add_argument("--full", action="store_true", help="the README's sizes (~23 min, 2 cores)")
    p.add_argument("--large", action="store_true", help="add the largest sizes")
    p.add_argument("--only", default=None, help=f"comma-separated subset of {MODULES}")
    p.add_argument("--json", default=None, help="write all rows as JSON to this path")
    p.add_argument("--out", default="bench_out", help="folder for plots (PNG)")
    p.add_argument("--reps", type=int, default=None, help="timed runs per function")
    return p


def main(argv=None) -> int:
    cli = parser()
    args = cli.parse_args(argv)
    names = MODULES if args.only is None else args.only.split(",")
    unknown = sorted(set(names) - set(MODULES))
    if unknown:
        cli.error(f"unknown --only {unknown}; choose from {MODULES}")
    tier = "quick" if args.quick else "full" if args.full else "default"
    code = commit()
    print(f"# softjax bench ({tier} sizes) on {machine()}, commit {code}", flush=True)
    all_rows, start = [], time.perf_counter()
    total = sum(WEIGHTS[n] for n in names)
    done = 0.0

    def print_row(row):  # each row as it is measured, under the header
        row.setdefault("family", current)
        print(format_line([cell(row.get(c)) for c in COLUMNS]), flush=True)

    harness._REPORTER[:] = [print_row]
    for k, name in enumerate(names, 1):
        elapsed = time.perf_counter() - start
        eta = f", about {elapsed * (total - done) / done:.0f} s left" if done else ""
        print(f"\n[{k}/{len(names)}] {name} ... ({elapsed:.0f} s so far{eta})", flush=True)
        print(format_line(list(COLUMNS)), flush=True)
        current = name
        t0 = time.perf_counter()
        module = importlib.import_module(f"bench.{name}")
        rows = module.run(args)
        for r in rows:
            r.setdefault("family", name)
            r.pop("_reported", None)
        done += WEIGHTS[name]
        took = time.perf_counter() - t0
        print(f"## {name}: {len(rows)} rows in {took:.0f} s", flush=True)
        all_rows.extend(rows)
    harness._REPORTER.clear()
    print(f"\n{summary(all_rows)}; {time.perf_counter() - start:.0f} s in all", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            command = " ".join(["python -m bench", *(argv if argv is not None else sys.argv[1:])])
            run = {"machine": machine(), "command": command, "tier": tier, "commit": code}
            run["seconds"] = round(time.perf_counter() - start)
            json.dump({**run, "rows": all_rows}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
