"""Specialization per hardware target: accuracy data and predictor, latency tables,
evolutionary search, export and model cards, reproduction, and the per-target NAS baseline."""
