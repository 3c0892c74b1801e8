"""Evaluation: CV-Bench protocol (cvbench.py) and layer probing (probe.py)."""
