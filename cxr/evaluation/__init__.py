"""Scoring finished runs: inference, predictions, metrics, calibration, subgroups, reports."""
