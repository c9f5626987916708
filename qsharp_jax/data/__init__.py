"""Datasets and on-disk storage."""
