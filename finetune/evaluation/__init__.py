"""Evaluation on the test split: metrics (metrics.py); their pictures are drawn by finetune.report."""
