"""Typed records passed between the pipeline stages."""
