"""The six methods, each in plain PyTorch: losses, training loops, evaluation. No KFP, MLflow or KServe here."""
