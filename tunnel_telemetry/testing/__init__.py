"""Importable helpers for tests and benchmarks (and a fake OONI collector for operators)."""
