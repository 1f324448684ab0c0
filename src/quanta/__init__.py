"""Quanta: real-time endpoint management."""

__version__ = "0.1.0"
