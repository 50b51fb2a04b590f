"""Model Server: shared pieces of every process role (settings, logging, exit codes, CLI)."""

__version__ = "0.1.0"
