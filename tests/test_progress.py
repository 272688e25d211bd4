"""Progress where the output is not a terminal (a cluster job's log): plain lines every N steps or T
seconds, and one per validation."""
import re

from mixer_cli.commands.pretrain import pretrain
from mixer_cli.config.compose import compose

STEP_LINE = re.compile(r"^epoch (\d)/2  step (\d)/8  loss \d+\.\d{4}  lr \d\.\d\de-\d\d  [\d,]+ img/s  "
                       r"ETA \d+:\d\d:\d\d$")
VALIDATION_LINE = re.compile(r"^validation at step (\d): top1 \d+\.\d\d%  top5 \d+\.\d\d%  loss \d+\.\d{4}$")


def progress_lines(capsys, tmp_path, tiny_run, every_steps: int, every_seconds: float) -> list[str]:
    """Two epochs of 4 steps on the demo digits (global batch 1,000 of 4,000), stdout a pipe."""
    capsys.readouterr()
    pretrain(compose([*tiny_run, "data.global_batch=1000", "trainer.epochs=2", f"run_root={tmp_path}",
                      f"trainer.progress_every_steps={every_steps}",
                      f"trainer.progress_every_seconds={every_seconds}"]))
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith(("epoch", "validation"))]


def summary(lines: list[str]) -> list[str]:
    """Each line as `e<epoch>s<step>` or `v<step>`; a line of another format fails the test."""
    out = []
    for line in lines:
        step, validation = STEP_LINE.match(line), VALIDATION_LINE.match(line)
        assert step or validation, line
        out.append(f"e{step[1]}s{step[2]}" if step else f"v{validation[1]}")
    return out


def test_a_line_every_n_steps_and_one_per_validation(capsys, tmp_path, tiny_run):
    lines = progress_lines(capsys, tmp_path, tiny_run, every_steps=2, every_seconds=3600)
    assert summary(lines) == ["e1s2", "e1s4", "v4", "e2s6", "e2s8", "v8"]


def test_a_line_every_t_seconds(capsys, tmp_path, tiny_run):
    lines = progress_lines(capsys, tmp_path, tiny_run, every_steps=1000, every_seconds=1e-6)
    # the first step only starts the clock: the rate and ETA need two
    assert summary(lines) == ["e1s2", "e1s3", "e1s4", "v4", "e2s5", "e2s6", "e2s7", "e2s8", "v8"]
