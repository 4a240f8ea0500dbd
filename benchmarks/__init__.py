"""Benchmarks of tf_dpsat; see benchmarks/README.md."""
