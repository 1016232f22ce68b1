"""Command line: ``ssni <command>``; the only layer that reads configuration."""

from .main import main

__all__ = ["main"]
