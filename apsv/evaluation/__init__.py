"""Evaluation: scaling policies compared on traces, simulated and through the live system;
their claims and plots. It runs the simulator and the runtime; nothing below imports it."""
