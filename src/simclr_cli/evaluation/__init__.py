"""Evaluation: kNN, linear probes and metrics."""
