"""Helpers shared across samnorm's subpackages (no samnorm imports of their own)."""
