"""reid: person re-identification gallery search."""

__version__ = "0.1.0"
