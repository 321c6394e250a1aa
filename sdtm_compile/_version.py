"""The package version (one place, read by the package and by what it writes)."""

__version__ = "0.2.0"
