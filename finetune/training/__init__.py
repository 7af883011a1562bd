"""Training: the phases in order (train.py), one phase's mechanics (phases.py), the frozen part run once
(cuts.py, features.py), and what a run keeps as it trains (checkpoints.py)."""
