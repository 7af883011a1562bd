"""Export: the trained model in formats that serve it without finetune, each checked by its own runtime (formats.py)."""
