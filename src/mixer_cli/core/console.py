"""The one console every command prints to (rich: tables and progress on a terminal, plain text in a log)."""
from __future__ import annotations

from rich.console import Console

console = Console()
