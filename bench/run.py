"""Run the benchmarks, print the comparisons, write bench/results/latest.json.

    python -m bench.run [--quick] [--only NAME ...] [--output FILE] [--keep]

NAME is ``images`` (every image benchmark of the plan), ``images-p256``, ``images-rsa3072``, ``digest``,
``payloads`` (per-device payload throughput, key derivations, server memory under 32 streams) or
``registry`` (bulk registration of 1,000,000 devices, payload latency at 1,000 and 1,000,000 devices).
Without ``--only`` the images and digest benchmarks run; ``payloads`` and ``registry`` run only when named.
``--quick`` is a smoke run (P-256 images only, two short repetitions, well under a minute; ``payloads`` about
a minute; ``registry`` with 50,000 devices, under a minute): it shows the benchmarks still work, its numbers
mean little. The full run takes a few minutes; ``payloads`` about 3, ``registry`` about 3 on the reference
machine (1,000,000 registrations; allow up to 12 on a slower one). The numbers are reported, never
asserted; see docs/benchmarks.md for the method.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from bench import payloads, registry
from bench.common import (
    IMAGE_KEYS,
    Comparison,
    Limit,
    WorkerPool,
    environment,
    format_limits,
    format_series,
    format_table,
    log,
    machine_info,
    write_results,
)
from bench.signing import FULL, QUICK, digest_benchmark, images_benchmark

NAMES = ("images", *(f"images-{name}" for name in IMAGE_KEYS), "digest", "payloads", "registry")


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
    parser.add_argument("--quick", action="store_true", help="a smoke run: about a minute per benchmark")
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
    limits: list[Limit] = []
    details: dict[str, object] = {}
    plans: dict[str, object] = {}
    if image_keys or digests:
        plans["signing"] = asdict(plan)
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
    if "payloads" in (args.only or ()):
        payloads_plan = payloads.QUICK if args.quick else payloads.FULL
        plans["payloads"] = asdict(payloads_plan)
        with environment([payloads.PAYLOAD_KEY], keep=args.keep, product_sets=[payloads.PRODUCT]) as env:
            log(f"starting {payloads_plan.processes} client processes")
            with WorkerPool(env.worker_setup(), payloads_plan.processes) as pool:
                found, bounds, details["payloads"] = payloads.payloads_benchmark(env, pool, payloads_plan)
                comparisons += found
                limits += bounds
    if "registry" in (args.only or ()):
        registry_plan = registry.QUICK if args.quick else registry.FULL
        plans["registry"] = asdict(registry_plan)
        found, bounds, details["registry"] = registry.run(registry_plan, keep=args.keep)
        comparisons += found
        limits += bounds
    elapsed = time.monotonic() - began
    info["load_average_after"] = os.getloadavg()

    print(
        f"\nfirmware KMS benchmarks ({'quick' if args.quick else 'full'} run, {info['date']}, "
        f"{info['cpus']} CPUs {info['cpu_model']}, commit {info['commit'] or 'unknown'}, {elapsed:.0f} s)\n"
    )
    if comparisons:
        print(format_table(comparisons))
    if limits:
        print(("\n" if comparisons else "") + format_limits(limits))
    print("\nmedians from:")
    print(format_series(comparisons, limits))
    document: dict[str, object] = {
        "mode": "quick" if args.quick else "full",
        "plan": plans.get("signing"),
        "plans": plans,
        "machine": info,
        "elapsed_seconds": elapsed,
        "comparisons": [c.to_json() for c in comparisons],
        "limits": [limit.to_json() for limit in limits],
        "details": details,
    }
    path = write_results(document, args.output)
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
