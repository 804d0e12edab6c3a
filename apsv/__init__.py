"""APSV: Adaptive Protocol Stack Virtualization."""

__version__ = "0.1.0"
