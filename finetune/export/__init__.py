"""Export: the trained model in formats that serve it without finetune (saved_model.py)."""
