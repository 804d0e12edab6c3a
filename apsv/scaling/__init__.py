"""Scaling policies: pure functions of a context, used by the live VPSM and the simulator alike."""
