"""`python -m mixer_cli ...`: the `mixer` command where no console script is installed."""
from mixer_cli.cli import main

main()
