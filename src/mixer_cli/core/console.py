"""The consoles every command prints to (rich: tables and progress on a terminal, plain text in a log):
results to standard output, errors and warnings to standard error."""
from __future__ import annotations

from rich.console import Console
from rich.progress import MofNCompleteColumn, Progress

console = Console()
err_console = Console(stderr=True)


def counting_progress(to: Console) -> Progress:
    """A bar with done/total counts that is gone once the work ends (the result line follows)."""
    return Progress(*Progress.get_default_columns(), MofNCompleteColumn(), console=to, transient=True)
