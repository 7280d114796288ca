"""Benchmarks of the firmware KMS against the baselines the issue names (``python -m bench.run``).

- ``bench.signing``: ESP app images signed per second through the service vs ``espsecure sign-data --hsm``
  (one process per image), and digest signatures per second vs a bare gRPC unary echo.
- ``bench.echo``: that echo server, over the same mutual TLS, options and thread pool as the service.
- ``bench.common``: the environment (state directory, running servers), client worker processes,
  statistics and the report.

Benchmarks report numbers; they never assert them. Method and results: docs/benchmarks.md.
"""
