"""stacker's benchmark suite: `python -m benchmarks --help` (or `make bench`)."""
