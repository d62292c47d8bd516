"""Pretraining: schedules, optimiser parameter groups, EMA teacher update, health signals, and the training loop."""
