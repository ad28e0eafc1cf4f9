"""Metis services."""
