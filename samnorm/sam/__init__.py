"""The SAM optimizer core."""
