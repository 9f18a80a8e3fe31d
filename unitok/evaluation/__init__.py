"""Evaluation: every metric and judge."""
