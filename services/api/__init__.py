"""Inference API: serves the registry's champion over /predict and MLflow-compatible /invocations."""
