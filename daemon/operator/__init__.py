"""Operator tools for a bad day: an attempt's story, stuck unknowns, the dead-letter queue."""
