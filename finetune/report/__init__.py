"""What a run leaves for people to look at: plots of its history and results, and report.html (see write.py)."""
