"""Helpers of load/bench.py: services and processes, traffic, /proc readings, the report."""
