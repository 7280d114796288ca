"""Run the benchmarks, print the comparisons, write bench/results/latest.json.

    python -m bench.run [--quick] [--only NAME ...] [--output FILE] [--keep]

NAME is ``images`` (every image benchmark of the plan), ``images-p256``, ``images-rsa3072`` or ``digest``.
``--quick`` is a smoke run (P-256 images only, two short repetitions; well under a minute): it shows the
benchmarks still work, its numbers mean little. The full run takes a few minutes. The numbers are reported,
never asserted; see docs/benchmarks.md for the method.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from bench.common import (
    IMAGE_KEYS,
    Comparison,
    WorkerPool,
    environment,
    format_series,
    format_table,
    log,
    machine_info,
    write_results,
)
from bench.signing import FULL, QUICK, digest_benchmark, images_benchmark

NAMES = ("images", *(f"images-{name}" for name in IMAGE_KEYS), "digest")


def _selected(only: Sequence[str] | None, quick: bool) -> tuple[list[str], bool]:
    """The image keys to benchmark and whether to run the digest benchmark."""
    if not only:
        return (["p256"] if quick else list(IMAGE_KEYS)), True
    images: list[str] = []
    for name in only:
        if name == "images":
            images += ["p256"] if quick else list(IMAGE_KEYS)
        elif name.startswith("images-"):
            images.append(name.removeprefix("images-"))
    return list(dict.fromkeys(images)), "digest" in only


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run in well under a minute")
    parser.add_argument(
        "--only", action="append", choices=NAMES, metavar="NAME", help=f"one of {', '.join(NAMES)}"
    )
    parser.add_argument("--output", type=Path, help="JSON results (default bench/results/latest.json)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary state directory")
    args = parser.parse_args(argv)
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

    plan = QUICK if args.quick else FULL
    image_names, digests = _selected(args.only, args.quick)
    image_keys = [IMAGE_KEYS[name] for name in image_names]
    began = time.monotonic()
    info = machine_info()
    comparisons: list[Comparison] = []
    with environment(image_keys, keep=args.keep) as env:
        clients = max(plan.concurrent_clients if image_keys else 0, plan.digest_clients if digests else 0)
        log(f"starting {clients} client processes")
        with WorkerPool(env.worker_setup(), clients) as pool:
            for key in image_keys:
                log(f"images {key.label}: {plan.repetitions} repetitions")
                comparisons += images_benchmark(env, pool, key, plan)
            if digests:
                log(f"digests: {plan.repetitions} repetitions of {plan.digest_seconds:g} s windows")
                comparisons += digest_benchmark(pool, plan)
    elapsed = time.monotonic() - began
    info["load_average_after"] = os.getloadavg()

    print(
        f"\nfirmware KMS benchmarks ({'quick' if args.quick else 'full'} run, {info['date']}, "
        f"{info['cpus']} CPUs {info['cpu_model']}, commit {info['commit'] or 'unknown'}, {elapsed:.0f} s)\n"
    )
    print(format_table(comparisons))
    print("\nmedians from:")
    print(format_series(comparisons))
    document: dict[str, object] = {
        "mode": "quick" if args.quick else "full",
        "plan": asdict(plan),
        "machine": info,
        "elapsed_seconds": elapsed,
        "comparisons": [c.to_json() for c in comparisons],
    }
    path = write_results(document, args.output)
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
