"""The `mixer` command line: Typer parses the options; everything after them is Hydra override
syntax (`recipe=NAME key=value ...`), so every config value is reachable from the command line."""
from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from mixer_cli.errors import UserError

app = typer.Typer(
    name="mixer",
    help="Pre-train, fine-tune and evaluate MLP-Mixer models; reproduce Tolstikhin et al. (2021).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
err = Console(stderr=True)

OVERRIDES = typer.Argument(None, metavar="[OVERRIDES]...", help="Hydra overrides: recipe=NAME key=value ...", show_default=False)


def _version(value: bool) -> None:
    if value:
        from mixer_cli import __version__

        typer.echo(f"mixer {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Pre-train, fine-tune and evaluate MLP-Mixer models; reproduce Tolstikhin et al. (2021)."""


def user_errors(fn):
    """A user's mistake ends in one readable line and exit status 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        try:
            return fn(*args, **kwargs)
        except (UserError, MisconfigurationException) as e:
            err.print(f"[bold red]error:[/] {str(e).strip().splitlines()[0]}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]: the last complete checkpoint is kept; continue with --resume RUN_DIR")
            raise typer.Exit(130) from None

    return wrapper


@app.command(
    epilog="Examples: [bold]mixer pretrain[/] (the bundled demo) · "
    "[bold]mixer pretrain recipe=i21k_b16 trainer.devices=8[/] · "
    "[bold]mixer pretrain --resume runs/pretrain/20261125-101500-demo[/]"
)
@user_errors
def pretrain(
    overrides: Optional[list[str]] = OVERRIDES,
    resume: Optional[Path] = typer.Option(
        None, "--resume", help="Continue the run in this directory from its last.ckpt (overrides apply on top).",
        file_okay=False,
    ),
):
    """Pre-train a Mixer as a recipe says (no recipe: the bundled demo, minutes on a CPU)."""
    from mixer_cli.config import compose
    from mixer_cli.train.pretrain import pretrain as run_pretrain
    from mixer_cli.train.pretrain import resume_config

    overrides = overrides or []
    if resume is not None:
        if not (resume / "last.ckpt").is_file():
            raise UserError(f"nothing to resume in {resume}: no last.ckpt there")
        cfg = resume_config(resume, overrides)
    else:
        cfg = compose(overrides)
    run_pretrain(cfg, resume=resume)


def main() -> None:
    app(prog_name="mixer")


if __name__ == "__main__":
    sys.exit(main())
