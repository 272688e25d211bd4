"""Launches that cannot run end with one line and exit 2 before anything is written (train/launch.py)."""
import importlib.util
import json

import pytest
from typer.testing import CliRunner

from mixer_cli.cli import app
from mixer_cli.config.compose import compose
from mixer_cli.core.errors import UserError
from mixer_cli.train import launch
from mixer_cli.train.launch import check_launch, settle_auto


def refused(tmp_path, *args, command: tuple[str, ...] = ("pretrain", "trainer.steps=1")) -> str:
    """The one line `mixer pretrain args` ends with; asserts exit 2, no traceback, no run directory."""
    r = CliRunner().invoke(app, [*command, *args, f"run_root={tmp_path}"])
    assert r.exit_code == 2 and (r.exception is None or isinstance(r.exception, SystemExit)), r.output
    assert not (tmp_path / command[0]).exists()
    assert r.stderr.count("\n") == 1
    return r.stderr.removesuffix("\n")


def test_fsdp_on_a_cpu_is_refused(tmp_path, no_launcher):
    assert refused(tmp_path, "trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2") == (
        "error: trainer.strategy=FSDPStrategy cannot run with trainer.accelerator=cpu (devices=2, "
        "precision=32-true): The strategy `fsdp` requires a GPU accelerator, but received `accelerator='cpu'`. "
        "Please set `accelerator='cuda'`, `accelerator='gpu'`, or pass a `CUDAAccelerator()` instance to use FSDP.")


@pytest.mark.skipif(importlib.util.find_spec("torch_xla") is not None, reason="torch_xla is installed")
def test_xla_without_torch_xla_is_refused(tmp_path, no_launcher):
    assert refused(tmp_path, "trainer=xla", "trainer.accelerator=cpu").startswith(
        "error: trainer.strategy=xla cannot run with trainer.accelerator=cpu (devices=auto, precision=32-true): "
        "Requirement 'torch_xla>=1.13' not met.")


def test_nodes_no_launcher_starts_are_refused(tmp_path, no_launcher):
    assert refused(tmp_path, "trainer.num_nodes=2", "trainer.accelerator=cpu") == (
        "error: trainer.num_nodes=2, but no launcher started the other nodes: run every node under SLURM "
        "(trainer=slurm) or torchrun (trainer=torchrun); see docs/reliability.md, 'Launching on several nodes'")


def test_mixer_eval_refuses_what_cannot_launch_in_its_own_keys(tmp_path, no_launcher, constant_checkpoint):
    """Lightning would wait forever for the nodes no launcher starts."""
    assert refused(tmp_path, "eval.accelerator=cpu", "eval.num_nodes=2",
                   command=("eval", "--from", str(constant_checkpoint))) == (
        "error: eval.num_nodes=2, but no launcher started the other nodes: run every node under SLURM or torchrun; "
        "see docs/reliability.md, 'Launching on several nodes'")
    if importlib.util.find_spec("transformer_engine") is None:
        assert refused(tmp_path, "eval.accelerator=cpu", "eval.precision=transformer-engine",
                       command=("eval", "--from", str(constant_checkpoint))).startswith(
            "error: eval.accelerator=cpu cannot run (devices=1, precision=transformer-engine): Requirement "
            "'transformer_engine")


@pytest.fixture
def slurm_job(monkeypatch, no_launcher):
    """Rank 0 of a SLURM job of 2 nodes x 1 task."""
    for name, value in {"SLURM_JOB_ID": "77", "SLURM_JOB_NAME": "mixer", "SLURM_NTASKS": "2", "SLURM_NNODES": "2",
                        "SLURM_NTASKS_PER_NODE": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
                        "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}.items():
        monkeypatch.setenv(name, value)


def test_slurm_sizes_the_launch(slurm_job):
    assert check_launch(compose(["trainer=slurm", "trainer.accelerator=cpu", "trainer.devices=1"]).trainer) == 2
    with pytest.raises(UserError, match=r"^trainer\.num_nodes=1, but this SLURM job has 2 node\(s\): use "
                                        r"trainer=slurm \(it reads SLURM_NNODES\) or trainer\.num_nodes=2$"):
        check_launch(compose(["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=1"]).trainer)


def test_slurm_sizes_mixer_evals_launch(slurm_job, monkeypatch):
    assert check_launch(compose(["eval.accelerator=cpu", "eval.num_nodes=2"], config_name="eval").eval, "eval") == 2
    with pytest.raises(UserError, match=r"^eval\.num_nodes=1, but this SLURM job has 2 node\(s\): set "
                                        r"eval\.num_nodes=2$"):
        check_launch(compose(["eval.accelerator=cpu"], config_name="eval").eval, "eval")


def test_slurm_tasks_must_be_the_devices(slurm_job, monkeypatch):
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "2")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    with pytest.raises(UserError, match=r"^trainer\.devices=1 x trainer\.num_nodes=2 = 2 processes, but SLURM "
                                        r"started 4 tasks: one task per device \(--ntasks-per-node=devices\)$"):
        check_launch(compose(["trainer=slurm", "trainer.accelerator=cpu", "trainer.devices=1"]).trainer)


def test_torchrun_sizes_the_launch(monkeypatch, no_launcher):
    for name, value in {"TORCHELASTIC_RUN_ID": "job", "RANK": "0", "GROUP_RANK": "0", "LOCAL_RANK": "0",
                        "LOCAL_WORLD_SIZE": "1", "GROUP_WORLD_SIZE": "3", "WORLD_SIZE": "3"}.items():
        monkeypatch.setenv(name, value)
    assert check_launch(compose(["trainer=torchrun", "trainer.accelerator=cpu"]).trainer) == 3
    with pytest.raises(UserError, match=r"^trainer\.devices=1 x trainer\.num_nodes=1 = 1 processes, but torchrun "
                                        r"started 3: use trainer=torchrun \(it reads torchrun's sizes\)$"):
        check_launch(compose(["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=1"]).trainer)
    with pytest.raises(UserError, match=r"^eval\.devices=1 x eval\.num_nodes=1 = 1 processes, but torchrun started "
                                        r"3: set eval\.devices to torchrun's --nproc-per-node, eval\.num_nodes to "
                                        r"its --nnodes$"):
        check_launch(compose(["eval.accelerator=cpu"], config_name="eval").eval, "eval")


@pytest.mark.parametrize("trainer", ["default", "ddp", "fsdp", "slurm", "torchrun"])
@pytest.mark.parametrize(("device", "bf16", "precision", "compiled"), [
    ("cuda", True, "bf16-mixed", True), ("cuda", False, "16-mixed", True),  # a V100 has no bf16: fp16 + loss scaling
    ("cpu", True, "32-true", False), ("mps", True, "32-true", False)])
def test_auto_precision_and_compile_follow_the_device_the_trainer_picks(monkeypatch, trainer, device, bf16,
                                                                         precision, compiled):
    monkeypatch.setattr(launch, "accelerator_name", lambda name: device if name == "auto" else name)
    monkeypatch.setattr(launch.torch.cuda, "is_bf16_supported", lambda: bf16)
    t = compose([f"trainer={trainer}"]).trainer
    eager = trainer == "fsdp"  # compiled FSDP has not run on a GPU yet
    assert (t.precision, t.compile) == ("auto", False if eager else "auto")
    settle_auto(t)
    assert (t.precision, t.compile) == (precision, compiled and not eager)
    # what a user sets is kept, on any device
    for compile in ("false", "reduce-overhead"):
        t = compose([f"trainer={trainer}", "trainer.precision=bf16-mixed", f"trainer.compile={compile}"]).trainer
        settle_auto(t)
        assert (t.precision, t.compile) == ("bf16-mixed", {"false": False}.get(compile, compile))


@pytest.mark.parametrize(("given", "ran"), [([], "32-true"), (["trainer.precision=32"], 32)])  # auto; Lightning's int
def test_a_run_records_the_precision_and_compile_auto_chose(tmp_path, tiny_run, no_launcher, given, ran):
    from omegaconf import OmegaConf

    args = [a for a in tiny_run if not a.startswith("trainer.precision")]
    r = CliRunner().invoke(app, ["pretrain", *args, *given, "trainer.steps=1", "data.global_batch=8",
                                 f"run_root={tmp_path}"])
    assert r.exit_code == 0, r.output
    run_dir = next(tmp_path.glob("pretrain/*"))
    recorded = OmegaConf.load(run_dir / "config.yaml").trainer
    assert (recorded.precision, recorded.compile) == (ran, False)  # this machine has no GPU
    assert json.loads((run_dir / "results.json").read_text())["precision"] == str(ran)
