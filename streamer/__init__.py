"""Streaming anomaly detection for Kafka event feeds."""

__version__ = "0.1.0"
