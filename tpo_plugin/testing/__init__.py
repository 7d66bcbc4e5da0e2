"""Tiny random-weight models and images, built offline, for the demo, the tests and the benchmarks."""
