"""The consoles every command prints to (rich: tables and progress on a terminal, plain text in a log):
results to standard output, errors and warnings to standard error."""
from __future__ import annotations

from rich.console import Console

console = Console()
err_console = Console(stderr=True)
