"""Exact resume after pre-emption: runs stopped by real signals mid-epoch, continued, and compared
bit for bit with the same run left alone (same seed, CPU, one thread: torch.equal, a tolerance of zero).

The demo test runs `mixer pretrain` processes as a cluster does (SIGUSR1 under a stand-in SLURM job,
the requeued job continuing by itself, SIGINT, then --resume), each interrupted once it has written a
periodic last.ckpt (so trainer.checkpoint_every_steps / _minutes are exercised on the way); batches
are small so that a run lasts long enough. The shard test signals its own process at a known step, to stay
short. Both runs end inside their epoch, and still end with an evaluation. The loader test checks
the piece that makes the data exact: a training loader rebuilt from its state gives the very batches
the one left alone gives, for in-memory data and shards, with and without loader workers."""
import gzip
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from torch.utils.data import Dataset

from mixer_cli.commands.pretrain import build_model, pretrain
from mixer_cli.config.compose import compose
from mixer_cli.config.run_dirs import make_run_dir, resume_config, save_config
from mixer_cli.core.devices import torch_threads
from mixer_cli.core.errors import UserError
from mixer_cli.data import build_dataset
from mixer_cli.data.shards import rng_states, set_rng_states
from mixer_cli.data.workers import leave_stop_signals_to
from mixer_cli.data.writer import demo_samples, write_shards
from mixer_cli.evaluate.fewshot import make_loader
from mixer_cli.models import load_mixer
from mixer_cli.train.datamodule import ImageDataModule
from mixer_cli.train.fit import build, build_datasets, resume
from mixer_cli.train.preemption import Stopped

# 500 steps per epoch: every stop is mid-epoch; the run is shorter than an epoch.
DEMO = ["data.global_batch=8", "trainer.device_batch=4", "trainer.steps=100"]
# 40 steps per epoch over 800 training samples, two loader workers; the run ends in its second epoch.
SHARDS = ["data.num_workers=2", "data.global_batch=20", "trainer.steps=50"]


@pytest.fixture(scope="module")
def warm_run(tiny_run) -> list[str]:
    """The tiny run, warming up over its first 5 steps."""
    return [*tiny_run, "sched.warmup_steps=5"]
WAIT_S = 240  # bounds every wait; a loaded machine starts Python slowly


def mixer(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "mixer_cli.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)  # as load_mixer reads it


def wait_for_checkpoint(runs: Path, proc: subprocess.Popen, after: int = 0) -> tuple[Path, int]:
    """(run directory, step) once the running `proc` has written a last.ckpt beyond step `after`."""
    deadline, seen = time.monotonic() + WAIT_S, None
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended before it was interrupted:\n{proc.stderr.read()[-3000:]}"
        for ckpt in runs.glob("pretrain/*/last.ckpt"):
            if ckpt.stat().st_mtime_ns != seen:  # read a checkpoint only when a new one is there
                seen = ckpt.stat().st_mtime_ns
                if (step := checkpoint(ckpt)["global_step"]) > after:
                    return ckpt.parent, step
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"no checkpoint beyond step {after} within {WAIT_S}s")


def signal_after_checkpoint(runs: Path, proc: subprocess.Popen, sig: signal.Signals) -> tuple[Path, int]:
    """Send `sig` to `proc` once it has written its first last.ckpt; its run directory and that step."""
    run, step = wait_for_checkpoint(runs, proc)
    proc.send_signal(sig)
    return run, step


def while_running_reference(tmp_path: Path, overrides: list[str], proc: subprocess.Popen, sig: signal.Signals):
    """(the reference's directory, the run directory and step at which `sig` was sent): the reference
    trains here while a thread watches `proc` (two cores: the test takes the time of one run, not two)."""
    with ThreadPoolExecutor(1) as pool:
        signalled = pool.submit(signal_after_checkpoint, tmp_path / "runs", proc, sig)
        ref = reference(tmp_path, overrides)
        return ref, *signalled.result(timeout=WAIT_S)


def interrupt(proc: subprocess.Popen, sig: signal.Signals) -> tuple[int, str]:
    proc.send_signal(sig)
    return stopped(proc, sig)


def stopped(proc: subprocess.Popen, sig: signal.Signals) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"the run did not stop within {WAIT_S}s of {sig.name}")
    return proc.returncode, err


def finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 0, err[-3000:]


def assert_stopped(rc: int, err: str, sig: signal.Signals, run: Path, after: int, before: int) -> int:
    """The run exited with 128 + the signal after saving a checkpoint at the step it names; that step."""
    step = checkpoint(run / "last.ckpt")["global_step"]
    assert rc == 128 + sig, err[-3000:]
    assert f"stopped by {sig.name} after step {step} (epoch 0); {run / 'last.ckpt'} holds it" in err
    assert after < step < before
    return step


def one_thread(run, *args, **kwargs):
    """run(*args) in this process on one thread, as the `mixer` processes run (OMP_NUM_THREADS=1)."""
    with torch_threads(1):
        return run(*args, **kwargs, progress=False)


def train(cfg, callback, progress: bool = False) -> dict:
    """A pre-training run of cfg with one more Lightning callback."""
    job = build(cfg, build_model(cfg), build_datasets(cfg))
    job.callbacks.append(callback)
    return job.run("pretrain", progress=progress)


def reference(tmp_path: Path, overrides: list[str]) -> Path:
    """The directory of the run left alone."""
    return Path(one_thread(pretrain, compose([*overrides, f"run_root={tmp_path / 'reference'}"]))["run_dir"])


def assert_same_run(run: Path, ref: Path, steps: int) -> None:
    got, want = checkpoint(run / "last.ckpt"), checkpoint(ref / "last.ckpt")
    assert got["global_step"] == want["global_step"] == steps
    assert got["state_dict"].keys() == want["state_dict"].keys()
    for name, value in want["state_dict"].items():
        assert torch.equal(got["state_dict"][name], value), f"{name}: {(got['state_dict'][name] - value).abs().max()}"
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == steps and isinstance(results["top1"], float) and 0 <= results["top1"] <= 1
    assert results["top1"] == json.loads((ref / "results.json").read_text())["top1"]


def slurm_job(tmp_path: Path) -> dict:
    """The environment of a one-task SLURM job 4242 whose scontrol only notes what it is asked."""
    (tmp_path / "bin").mkdir()
    scontrol = tmp_path / "bin" / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    scontrol.chmod(0o755)
    return {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "mixer", "SLURM_PROCID": "0",
            "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}


def requeued(job: dict, times: int) -> dict:
    return {**job, "SLURM_RESTART_COUNT": str(times)}


@pytest.mark.slow
def test_sigusr1_requeues_the_slurm_job_which_continues_its_run_by_itself_and_ends_as_the_run_left_alone(
        tmp_path, warm_run):
    runs, slurm = tmp_path / "runs", slurm_job(tmp_path)
    command = ["pretrain", *warm_run, *DEMO, "trainer.checkpoint_every_steps=10", f"run_root={runs}"]
    first = mixer(command, tmp_path, slurm)
    ref, run, step = while_running_reference(tmp_path, [*warm_run, *DEMO], first, signal.SIGUSR1)
    assert step % 10 == 0  # written by checkpoint_every_steps, inside the first epoch
    rc, err = stopped(first, signal.SIGUSR1)
    stop1 = assert_stopped(rc, err, signal.SIGUSR1, run, 0, 100)
    assert "SLURM requeued job 4242, which continues from it" in err
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    assert run.name == "slurm4242-demo"

    # The requeued job runs the same command, finds its run directory and continues from its last.ckpt.
    second = mixer(command, tmp_path, requeued(slurm, 1))
    wait_for_checkpoint(runs, second, after=stop1)
    stop2 = assert_stopped(*interrupt(second, signal.SIGINT), signal.SIGINT, run, stop1, 100)
    assert [p.name for p in (runs / "pretrain").iterdir()] == [run.name]

    # By hand, with the timer instead of the step count: only checkpoint_every_minutes can write the
    # next last.ckpt before the end; then the run goes on to its end.
    third = mixer(["pretrain", f"--resume={run}", "trainer.checkpoint_every_steps=null",
                   "trainer.checkpoint_every_minutes=0.005"], tmp_path)
    assert wait_for_checkpoint(runs, third, after=stop2)[1] < 100
    finish(third)
    assert_same_run(run, ref, steps=100)


def test_a_one_task_slurm_job_names_its_runs_and_only_a_requeued_one_continues_one(tmp_path, monkeypatch,
                                                                                    no_launcher):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    cfg, other = compose([f"run_root={tmp_path}"]), compose([f"run_root={tmp_path}", "seed=1"])

    def run_dir(cfg, restarts: int, *files: str) -> Path:
        """The directory a command of the job gets, with its config and `files`."""
        monkeypatch.setenv("SLURM_RESTART_COUNT", str(restarts))
        path = make_run_dir(cfg, "pretrain")
        save_config(cfg, path)
        for name in files:
            (path / name).touch()
        return path

    done = run_dir(cfg, 0, "last.ckpt", "results.json")
    stopped_run = run_dir(other, 0, "last.ckpt")  # another command of the job, same name
    again = run_dir(cfg, 0)  # a job's first start never continues a run, even one of the same config
    assert [p.name for p in (done, stopped_run, again)] == ["slurm4242-demo", "slurm4242-1-demo", "slurm4242-2-demo"]
    assert run_dir(other, 1) == stopped_run  # requeued: the run of this very config
    assert run_dir(cfg, 1) == again  # of two, the unfinished one
    (again / "results.json").touch()
    (again / "config.yaml").write_text("")  # damaged: not a run to continue
    assert run_dir(cfg, 2) == done  # finished: continuing it evaluates the final weights again
    (done / "last.ckpt").unlink()  # finished with nothing to continue from, as a few-shot evaluation
    assert run_dir(cfg, 3).name == "slurm4242-3-demo"  # so a new one
    assert run_dir(compose([f"run_root={tmp_path}", "seed=2"]), 1).name == "slurm4242-4-demo"  # none of its config


def write_demo_data(root: Path, form: str = "indexed") -> list[str]:
    """800 training digits in 4 shards (two per loader worker of two), 200 test digits; their overrides.
    form: "indexed" (local tars), "streamed" (the tars gzipped, so that they are streamed, not indexed),
    "parquet" (Hugging Face parquet files of 4 row groups, streamed), "disk" (a save_to_disk folder)."""
    classes, train = demo_samples("train")
    classes, test = demo_samples("test")
    if form in ("parquet", "disk"):
        from hf_sets import hf_rows

        for split, samples in (("train", train[:800]), ("test", test[:200])):
            rows = hf_rows([s.read() for s in samples], [s.label for s in samples], classes)
            rows.save_to_disk(str(root / "disk" / split))
            rows.to_parquet(str(root / "parquet" / f"{split}.parquet"), batch_size=200)
        return ["data=hf", f"data.train_path={root / form / 'train'}{'.parquet' * (form == 'parquet')}",
                f"data.eval_path={root / form / 'test'}{'.parquet' * (form == 'parquet')}", "data.img_size=28",
                "data.channels=1", "data.mean=[0.5]", "data.std=[0.5]", "data.interpolation=bilinear"]
    write_shards(classes, train[:800], root / "train", shard_size=200)
    write_shards(classes, test[:200], root / "test", shard_size=200)
    for tar in (root / "train").glob("*.tar") if form == "streamed" else ():
        tar.write_bytes(gzip.compress(tar.read_bytes()))
    return ["data.source=shards", f"data.train_path={root / 'train'}", f"data.eval_path={root / 'test'}"]


class SignalAt(Callback):
    """Sends `sig` to this process when the run reaches optimiser step `step`."""

    def __init__(self, step: int, sig: signal.Signals):
        self.step, self.sig, self.sent = step, sig, False

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.sig)


@pytest.mark.slow
@pytest.mark.parametrize(("batch", "stop_at", "form"), [
    (20, 13, "indexed"),  # inside the first epoch of 40 steps
    (20, 13, "streamed"),
    (20, 13, "disk"),
    # one step into the second epoch of 25 steps, 13 from one loader worker and 12 from the other: the
    # second had served its share of the first epoch and had none of the second to show yet
    (32, 26, "streamed"),
    (32, 26, "parquet"),
])
def test_sigterm_mid_epoch_then_resume_continues_the_shards_as_the_run_left_alone(
        tmp_path, warm_run, batch, stop_at, form):
    # In this process, to keep the test short: the signal is as real, the stop step known.
    shards = [*warm_run, *SHARDS, f"data.global_batch={batch}", *write_demo_data(tmp_path, form)]
    cfg = compose([*shards, f"run_root={tmp_path / 'runs'}"])
    with pytest.raises(Stopped) as stop:
        one_thread(train, cfg, SignalAt(stop_at, signal.SIGTERM))
    assert stop.value.code == 128 + signal.SIGTERM
    (run,) = (tmp_path / "runs" / "pretrain").iterdir()
    assert checkpoint(run / "last.ckpt")["global_step"] == stop_at

    one_thread(resume, run, [], "pretrain")  # into the second epoch
    assert_same_run(run, reference(tmp_path, shards), steps=50)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("source", ["demo", "shards"])
def test_a_stop_at_an_epochs_last_step_resumes_into_the_next_epoch(tmp_path, warm_run, source, workers):
    # Lightning ends an epoch after its batches, before the loader's own end: a loader state saved
    # there resumed the ended epoch, so the next epoch had no batches (8 of 12 steps on the demo)
    data = write_demo_data(tmp_path) if source == "shards" else []
    batch, epoch_steps = (32, 25) if source == "shards" else (1000, 4)  # 800 shard samples, 4,000 demo images
    overrides = [*warm_run, *data, f"data.num_workers={workers}", f"data.global_batch={batch}",
                 "trainer.epochs=2"]  # epochs, not steps: a lost epoch is not made up for by a third
    with pytest.raises(Stopped):
        one_thread(train, compose([*overrides, f"run_root={tmp_path / 'runs'}"]), SignalAt(epoch_steps, signal.SIGTERM))
    (run,) = (tmp_path / "runs" / "pretrain").iterdir()
    assert checkpoint(run / "last.ckpt")["global_step"] == epoch_steps
    one_thread(resume, run, [], "pretrain")
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 2 * epoch_steps and results["epochs"] == 2.0
    assert_same_run(run, reference(tmp_path, overrides), steps=2 * epoch_steps)


JOB = textwrap.dedent(
    """
    import os, subprocess, sys

    import lightning as L

    from mixer_cli.config.compose import compose
    from mixer_cli.train.fit import build, build_datasets
    from mixer_cli.commands.pretrain import build_model


    class SignalTheJob(L.Callback):
        # As scancel, a pre-emption, `timeout` or Ctrl+C do: the signal from another process to every
        # process of the job, loader workers included, at step 13 or at the first evaluation batch.
        def __init__(self, sig, in_evaluation):
            self.sig, self.in_evaluation, self.sent = sig, in_evaluation, False

        def on_train_batch_end(self, trainer, *args):
            if not self.in_evaluation and trainer.global_step == 13:
                self.send()

        def on_validation_batch_start(self, trainer, *args):
            if self.in_evaluation and not trainer.sanity_checking:
                self.send()

        def send(self):
            if not self.sent:
                self.sent = True
                kill = f"import os; os.killpg({os.getpgid(0)}, {self.sig})"
                subprocess.run([sys.executable, "-c", kill], start_new_session=True)  # from outside the job


    cfg = compose(sys.argv[3:])
    job = build(cfg, build_model(cfg), build_datasets(cfg))
    job.callbacks.append(SignalTheJob(int(sys.argv[1]), sys.argv[2] == "evaluation"))
    job.run("pretrain", progress=False)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "moment", "stop_step"), [
    (signal.SIGTERM, "training", 13), (signal.SIGINT, "training", 13), (signal.SIGUSR1, "training", 13),
    (signal.SIGTERM, "evaluation", 41),  # the evaluation after epoch 0 of 40 steps ends; the next step stops
])
def test_a_signal_to_every_process_of_the_job_stops_it_as_a_signal_to_its_main_process(
        sig, moment, stop_step, tmp_path, warm_run):
    (tmp_path / "job.py").write_text(JOB)
    runs = tmp_path / "runs"
    shards = [*warm_run, *SHARDS, *write_demo_data(tmp_path), f"run_root={runs}"]
    job = subprocess.run([sys.executable, "job.py", str(int(sig)), moment, *shards], cwd=tmp_path,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True,
                         capture_output=True, text=True, timeout=WAIT_S)
    assert job.returncode == 128 + sig and "Traceback" not in job.stderr, job.stderr[-3000:]
    (run,) = (runs / "pretrain").iterdir()
    assert checkpoint(run / "last.ckpt")["global_step"] == stop_step
    assert f"stopped by {sig.name} after step {stop_step} (epoch {stop_step // 41}); " in job.stderr


def training_loader(cfg, workers: int):
    """The training loader of `cfg`'s demo data (augmented: random shifts) with a device batch of 16,
    without Lightning; on shards, epochs of 8 batches (4 per worker of two)."""
    train = build_dataset(cfg.data, cfg.aug, "train", seed=0)
    batches = 8 if cfg.data.source == "shards" else len(train) // 16
    return ImageDataModule(None, 16, workers, train_set=train, micro_batches_per_epoch=batches).train_dataloader()


def refuse_cuda(*args):
    raise RuntimeError("Cannot re-initialize CUDA in forked subprocess")


def test_loader_workers_keep_their_random_state_without_touching_cuda(monkeypatch):
    # On a GPU the main process has started CUDA before its loader workers fork, and a worker that asks
    # for CUDA's generators fails as this one does: training with data.num_workers > 0 failed on GPUs.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", refuse_cuda)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", refuse_cuda)
    cfg = compose(["data.train_fraction=0.1"])
    first, second = training_loader(cfg, workers=2), training_loader(cfg, workers=2)
    batches = iter(first)
    next(batches), next(batches)
    second.load_state_dict(first.state_dict())  # the workers' random states travel, CUDA's not among them
    assert torch.equal(next(iter(second))[1], next(batches)[1])


def test_the_main_process_keeps_cudas_random_state_once_it_has_started_cuda(monkeypatch):
    kept, restored = [torch.arange(4, dtype=torch.uint8)], []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: kept)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    states = rng_states()
    set_rng_states(states)
    assert states["cuda"] is kept and restored == [kept]


class WorkerPids(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        time.sleep(0.01)  # workers that still have batches to make when the signals come
        return os.getpid()


def ended(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z"  # a zombie: dead, not yet reaped
    except FileNotFoundError:
        return True


@pytest.mark.slow
def test_loader_workers_outlive_the_jobs_signals_and_end_on_their_main_processs_sigterm():
    # Every loader of ours (here the few-shot one): the job's signals come from another process.
    loader = make_loader(WorkerPids(), batch_size=4, num_workers=2)
    batches = iter(loader)
    workers = {int(pid) for _ in range(2) for pid in next(batches)}
    assert len(workers) == 2
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        subprocess.run([sys.executable, "-c", f"import os; [os.kill(p, {int(sig)}) for p in {workers}]"], check=True)
    assert {int(pid) for batch in batches for pid in batch} == workers  # both served the rest of the epoch

    batches = iter(loader)  # new workers; a SIGTERM from this, their main process, ends one (as torch's shutdown)
    worker = int(next(batches)[0])
    os.kill(worker, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while not ended(worker):
        assert time.monotonic() < deadline, "a loader worker outlived its main process's SIGTERM"
        time.sleep(0.05)
    with pytest.raises(RuntimeError, match="DataLoader worker .* exited unexpectedly"):
        list(batches)


class ThreadsTakingSigterm(Dataset):
    """Each item: the threads of the worker that makes it that SIGTERM can be delivered to, but its waiter."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        waiter = {t.native_id for t in threading.enumerate() if t.name == "sigterm"}
        open_to_it = []
        for task in Path("/proc/self/task").iterdir():
            blocked = next(line for line in (task / "status").read_text().splitlines() if line.startswith("SigBlk"))
            if not int(blocked.split()[1], 16) & 1 << (signal.SIGTERM - 1) and int(task.name) not in waiter:
                open_to_it.append((task / "comm").read_text().strip())
        return ",".join(open_to_it)


def test_a_jobs_sigterm_can_reach_a_loader_worker_through_its_waiting_thread_only():
    # Else it may land on a thread the worker started before its worker_init_fn (torch's thread pool), and
    # torch's worker handler ends a worker there unless its main process sent it: torchrun's launcher,
    # which signals the whole process group, killed the workers, and so the run, before its checkpoint
    torch.set_num_threads(torch.get_num_threads())  # as Lightning does: torch's thread pool then exists
    loader = make_loader(ThreadsTakingSigterm(), batch_size=1, num_workers=2)
    assert [b for batch in loader for b in batch] == [""] * 8


def sigterm_blocked() -> bool:
    return signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, [])


def test_only_our_loaders_workers_start_with_sigterm_blocked():
    # A process-wide fork hook once blocked it in every later child, a multiprocessing Pool's too
    # (`mixer data write --workers`'s kind): Pool.terminate() could then not end an idle worker, and hung
    assert [b for batch in make_loader(ThreadsTakingSigterm(), batch_size=1, num_workers=1) for b in batch] == [""] * 8
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply(sigterm_blocked) is False
    assert not sigterm_blocked()  # nor in this process, after its loader's workers started


def signal_handling() -> tuple:
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])  # blocks nothing more: the mask as it is
    return signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGUSR1), blocked


def test_where_a_signals_sender_cannot_be_known_a_worker_keeps_torchs_signal_handling(monkeypatch):
    monkeypatch.delattr(signal, "sigwaitinfo")  # as on macOS
    before = signal_handling()
    try:
        leave_stop_signals_to(os.getpid())
        after = signal_handling()
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGUSR1, before[1])
        signal.pthread_sigmask(signal.SIG_SETMASK, before[2])
    assert after == before


class SigtermInEvaluation(Callback):
    """Sends SIGTERM to this process at the first evaluation batch of the trainer state `when` holds for."""

    def __init__(self, when):
        self.when, self.sent = when, False

    def on_validation_batch_start(self, trainer, *args):
        if self.when(trainer) and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)

    on_test_batch_start = on_validation_batch_start


def in_the_sanity_check(trainer) -> bool:
    return trainer.sanity_checking


def in_the_final_evaluation(trainer) -> bool:
    return trainer.state.fn == "test"


def test_a_signal_before_the_first_step_stops_the_run_after_it_with_a_checkpoint(tmp_path, capsys, warm_run):
    cfg = compose([*warm_run, "data.global_batch=100", "trainer.steps=3", f"run_root={tmp_path}"])
    with pytest.raises(Stopped) as stop:  # not Lightning's SIGTERMException, which exits with status 0
        train(cfg, SigtermInEvaluation(in_the_sanity_check))
    assert stop.value.code == 128 + signal.SIGTERM
    (run,) = (tmp_path / "pretrain").iterdir()
    assert checkpoint(run / "last.ckpt")["global_step"] == 1
    assert f"stopped by SIGTERM after step 1 (epoch 0); {run / 'last.ckpt'} holds it" in capsys.readouterr().err


def test_a_signal_during_the_final_evaluation_lets_it_finish_and_write_its_results(tmp_path, warm_run):
    # 3 steps of an epoch of 40: no evaluation during training, so the final one is the run's only one.
    cfg = compose([*warm_run, "data.global_batch=100", "trainer.steps=3", f"run_root={tmp_path}"])
    signal_it = SigtermInEvaluation(in_the_final_evaluation)
    results = train(cfg, signal_it)
    assert signal_it.sent and results["steps"] == 3 and results["num_samples"] == 1000
    assert json.loads(Path(results["run_dir"], "results.json").read_text())["top1"] == results["top1"]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("source", ["demo", "shards"])
def test_a_training_loader_continues_from_its_state_with_the_very_batches_it_would_have_given(
        source, workers, tmp_path):
    # The loader alone, without Lightning: stopped after 3 batches, then a new one from its state_dict
    # (and, without workers, the process's generators, which RandomState restores in a run).
    overrides = write_demo_data(tmp_path) if source == "shards" else ["data.train_fraction=0.1"]
    cfg = compose(overrides)
    first = training_loader(cfg, workers)
    left_alone, state, rng = [], None, None
    for _ in range(2):  # epochs
        for x, y in first:
            left_alone.append((x, y))
            if len(left_alone) == 3:
                state, rng = first.state_dict(), rng_states()
    torch.manual_seed(1)  # other generators than the stopped run's
    second = training_loader(cfg, workers)
    second.load_state_dict(state)
    batches = iter(second)
    set_rng_states(rng)
    continued = list(batches) + list(second)  # the rest of the first epoch, then the second
    assert len(continued) == len(left_alone) - 3 and len(left_alone) == 2 * len(first)
    for (x, y), (x2, y2) in zip(left_alone[3:], continued):
        assert torch.equal(y, y2) and torch.equal(x, x2)


# --- resuming on another layout -------------------------------------------------------------------

def layout_loader(cfg, device_batch: int, accumulate: int, workers: int, world: int = 1, rank: int = 0):
    """The training loader of rank `rank` of `world`, with `accumulate` micro-batches of `device_batch`
    per step, without Lightning."""
    train = build_dataset(cfg.data, cfg.aug, "train", seed=0)
    steps = len(train) // (device_batch * accumulate * world)
    module = ImageDataModule(None, device_batch, workers, train_set=train, accumulate=accumulate,
                             micro_batches_per_epoch=steps * accumulate)
    module._world = lambda: (world, rank)
    return module.train_dataloader()


@pytest.mark.parametrize("form", ["indexed", "disk"])
@pytest.mark.parametrize(("device_batch", "accumulate", "world"), [(8, 2, 1), (8, 1, 2), (4, 2, 2)])
def test_a_map_style_loaders_place_loads_into_other_devices_accumulation_and_workers(
        form, device_batch, accumulate, world, tmp_path):
    """Stopped after 3 steps of 1 x 16 on one device and no loader worker, continued on other layouts
    with two workers each: each step's samples, augmented alike, are the ones the run left alone had
    (a sample's augmentation is its own), the ranks' micro-batches in rank order."""
    cfg = compose(write_demo_data(tmp_path, form))
    first = layout_loader(cfg, 16, 1, 0)
    left_alone, state = [], None
    for x, y in first:
        left_alone.append((x, y))
        if len(left_alone) == 3:
            state = first.state_dict()
    assert state["position"] == {"epoch": 0, "steps": 3}
    ranks = [layout_loader(cfg, device_batch, accumulate, 2, world, rank) for rank in range(world)]
    for loader in ranks:
        loader.load_state_dict(state)
    per_rank = [list(loader) for loader in ranks]
    steps = [[part for batches in per_rank for part in batches[step * accumulate:(step + 1) * accumulate]]
             for step in range(len(per_rank[0]) // accumulate)]
    assert len(steps) == len(left_alone) - 3 > 0
    for (x, y), parts in zip(left_alone[3:], steps):
        assert torch.equal(y, torch.cat([y2 for _, y2 in parts])) and torch.equal(x, torch.cat([x2 for x2, _ in parts]))


@pytest.mark.parametrize(("device_batch", "accumulate", "world"), [(8, 2, 1), (8, 1, 2), (4, 2, 2)])
def test_a_streams_place_loads_into_other_layouts_which_restart_the_rest_of_its_epoch(
        device_batch, accumulate, world, tmp_path):
    """Stopped after 3 steps of 1 x 16 with two workers, continued on other layouts with two workers each:
    the epoch goes on for the steps it had left, from streams seeded anew (not the epoch's start again),
    then the next epoch is whole."""
    cfg = compose(write_demo_data(tmp_path, "streamed"))
    first = layout_loader(cfg, 16, 1, 2)
    batches = iter(first)
    for _ in range(3):
        next(batches)
    state = first.state_dict()
    assert state["position"] == {"epoch": 0, "steps": 3}
    steps = len(first)
    ranks = [layout_loader(cfg, device_batch, accumulate, 2, world, rank) for rank in range(world)]
    for loader in ranks:
        loader.load_state_dict(state)
    per_rank = [list(loader) for loader in ranks]
    assert [len(batches) for batches in per_rank] == [(steps - 3) * accumulate] * world
    assert {len(y) for batches in per_rank for _, y in batches} == {device_batch}
    _, fresh_labels = next(iter(layout_loader(cfg, device_batch, accumulate, 2, world, 0)))
    assert not torch.equal(per_rank[0][0][1], fresh_labels)
    assert [len(list(loader)) for loader in ranks] == [steps * accumulate] * world
    assert ranks[0].state_dict()["position"] == {"epoch": 1, "steps": steps}


@pytest.mark.parametrize("form", ["streamed", "parquet"])
def test_a_stream_restarted_on_another_layout_and_stopped_again_continues_exactly_on_that_one(form, tmp_path):
    cfg = compose(write_demo_data(tmp_path, form))
    first = layout_loader(cfg, 16, 1, 0)
    batches = iter(first)
    for _ in range(3):
        next(batches)
    restarted = layout_loader(cfg, 8, 2, 2)
    restarted.load_state_dict(first.state_dict())
    batches = iter(restarted)
    for _ in range(5 * 2):
        next(batches)
    state = restarted.state_dict()
    assert state["position"] == {"epoch": 0, "steps": 8}
    left_alone = list(batches)
    again = layout_loader(cfg, 8, 2, 2)
    again.load_state_dict(state)
    continued = list(again)
    assert len(continued) == len(left_alone) == (len(first) - 8) * 2
    for (x, y), (x2, y2) in zip(left_alone, continued):
        assert torch.equal(y, y2) and torch.equal(x, x2)


def test_a_stream_stopped_at_its_epochs_end_continues_on_another_layout_with_the_next_epoch(tmp_path):
    cfg = compose(write_demo_data(tmp_path, "streamed"))
    first = layout_loader(cfg, 16, 1, 2)
    list(first)
    state = first.state_dict()
    assert state["position"] == {"epoch": 0, "steps": len(first)}
    other = layout_loader(cfg, 8, 2, 0)
    other.load_state_dict(state)
    assert len(list(other)) == len(first) * 2
    assert other.state_dict()["position"] == {"epoch": 1, "steps": len(first)}


def test_a_streams_place_from_before_places_were_steps_loads_only_into_the_layout_that_saved_it(tmp_path):
    cfg = compose(write_demo_data(tmp_path, "streamed"))
    first = training_loader(cfg, workers=2)
    batches = iter(first)
    next(batches)
    state = first.state_dict()
    del state["position"]
    with pytest.raises(UserError) as refused:
        training_loader(cfg, workers=0).load_state_dict(state)
    assert str(refused.value) == (
        "this run's checkpoint holds the place in its training data of each of 1 process(es) and 2 loader "
        "worker(s) (it is from before places were saved as steps): resume it on 1 (trainer.devices x "
        "trainer.num_nodes) with data.num_workers=2; now 1 with 0")


def stopped_at(tmp_path: Path, overrides: list[str], step: int) -> Path:
    """The directory of a run stopped by SIGTERM after `step`, in this process."""
    with pytest.raises(Stopped):
        one_thread(train, compose([*overrides, f"run_root={tmp_path / 'runs'}"]), SignalAt(step, signal.SIGTERM))
    (run,) = (tmp_path / "runs" / "pretrain").iterdir()
    return run


@pytest.mark.slow
def test_a_run_stopped_with_loader_workers_resumes_without_them_as_the_run_left_alone(tmp_path, warm_run):
    """Loader workers change no sum: the same weights, bit for bit."""
    shards = [*warm_run, *SHARDS, *write_demo_data(tmp_path, "indexed")]
    run = stopped_at(tmp_path, shards, 13)
    one_thread(resume, run, ["data.num_workers=0"], "pretrain")
    assert_same_run(run, reference(tmp_path, shards), steps=50)


def loader_states(ckpt: dict) -> list[dict]:
    """The training loader's saved states in a checkpoint (Lightning's fit loop keeps them)."""
    return ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]


@pytest.mark.slow
def test_a_stream_stopped_with_loader_workers_resumes_without_them_and_ends_at_its_step(tmp_path, warm_run):
    """Its first epoch's 40 steps end after 40, even though its streams restart: the step count is kept."""
    run = stopped_at(tmp_path, [*warm_run, *SHARDS, *write_demo_data(tmp_path, "streamed")], 5)
    assert loader_states(checkpoint(run / "last.ckpt"))[0]["position"] == {"epoch": 0, "steps": 5}
    ended_epochs = []

    class EpochEnds(Callback):
        def on_train_epoch_end(self, trainer, *args):
            ended_epochs.append(trainer.global_step)

    cfg = resume_config(run, ["data.num_workers=0"])
    with torch_threads(1):
        job = build(cfg, load_mixer(run / "last.ckpt"), build_datasets(cfg))
        job.callbacks.append(EpochEnds())
        results = job.run("pretrain", run, progress=False)
    assert ended_epochs == [40, 50] and results["steps"] == 50


@pytest.mark.slow
def test_resuming_an_older_streams_checkpoint_on_other_workers_ends_in_one_line_and_leaves_the_run_as_it_was(
        tmp_path, warm_run):
    from typer.testing import CliRunner

    from mixer_cli.cli import app

    run = stopped_at(tmp_path, [*warm_run, *SHARDS, *write_demo_data(tmp_path, "streamed")], 5)
    older = checkpoint(run / "last.ckpt")
    for state in loader_states(older):
        del state["position"], state["accumulate"]
    torch.save(older, run / "last.ckpt")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    r = CliRunner().invoke(app, ["pretrain", "--resume", str(run), "data.num_workers=0"])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1, r.output
    assert r.stderr.startswith("error: this run's checkpoint holds the place in its training data of each of 1 "
                               "process(es) and 2 loader worker(s) (it is from before places were saved as steps)")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
