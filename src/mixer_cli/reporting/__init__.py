"""Runs read back and shown: a run's summary and curves, our runs beside the paper's tables."""
