"""The command line: one module per group of commands, all registering into one parser (`unitok.cli.app`)."""
from .app import main

__all__ = ["main"]
