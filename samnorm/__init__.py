"""samnorm: sharpness-aware fine-tuning (SAM on normalization layers) for OOD detection."""

__version__ = "0.1.0"
