"""Evaluation on the test split: metrics (metrics.py) and pictures of them (pictures.py)."""
