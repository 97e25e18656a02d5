"""xray: a staged training pipeline and service for a chest X-ray pneumonia classifier."""

__version__ = "0.1.0"
