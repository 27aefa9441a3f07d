"""Shared model families in plain PyTorch (no KFP, MLflow or KServe here)."""
