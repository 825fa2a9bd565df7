"""Importable helpers for tests and benchmarks."""
