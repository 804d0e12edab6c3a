"""Benchmarks that the CLI runs (`apsv bench ...`); benchmarks/ holds the scripts that call them."""
