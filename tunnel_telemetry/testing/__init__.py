"""Importable helpers for tests, benchmarks and operators (fake OONI collector, ...)."""
