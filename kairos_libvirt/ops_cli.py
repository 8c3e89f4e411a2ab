"""Operator commands (check, top, metrics): registered on the ``kairosvm`` parser."""
from __future__ import annotations

import argparse


def add_parsers(sub: "argparse._SubParsersAction") -> None:
    """Register the operator subcommands; each sets ``func`` like the core ones."""
