"""Benchmarks and the small-scale reproduction; each module runs as a script (its docstring says how)."""
