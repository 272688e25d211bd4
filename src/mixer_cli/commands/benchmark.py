"""`mixer benchmark`: throughput as in the paper's Tables 2-3, Mixer against ViT and BiT-ResNet.

The paper reports images per second per TPUv3 core, the highest over a batch-size sweep, at each
row's resolution. Here every model is timed on the device at hand, interleaved (A, B, C, A, B, C,
...) so that a busy machine slows all of them alike, with warm-up steps excluded and the best of
several samples kept. The paper's claims are then checked as ratios measured in the same run:
Mixer-B/16 against ViT-B/16, cost at 448 against 224 (linear in the number of patches for Mixer),
and our Mixer against timm's MlpMixer with the same architecture.
"""
from __future__ import annotations

import datetime as _dt
import platform
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial

import torch
from omegaconf import DictConfig, OmegaConf
from rich import box
from rich.table import Table
from torch import nn
from torch.nn import functional as F

from mixer_cli.config.run_dirs import Run
from mixer_cli.core.compiling import compile_mode
from mixer_cli.core.console import console
from mixer_cli.core.devices import pick_device, torch_threads
from mixer_cli.core.errors import UserError
from mixer_cli.models.mixer import TOKEN_MIXING, VARIANTS, build_mixer, spec_for, variant_key
from mixer_cli.train.module import fused_on_cuda


@dataclass(frozen=True)
class Contender:
    name: str  # what `models=[...]` accepts
    label: str  # the paper's name
    patch: int | None  # None: a convnet, any resolution
    build: Callable[[int], nn.Module] = field(repr=False)  # resolution -> model
    paper: dict[int, float] = field(default_factory=dict)  # resolution -> img/s/core on TPUv3


def _ours(variant: str, img_size: int, token_mixing: str = TOKEN_MIXING[0]) -> nn.Module:
    return build_mixer(variant, img_size=img_size, token_mixing=token_mixing)


def _timm_mixer(variant: str, img_size: int) -> nn.Module:
    """timm's MlpMixer with the paper's widths and tanh-GELU: the same function as ours."""
    from timm.models.mlp_mixer import MlpMixer

    s = spec_for(variant, img_size=img_size)
    return MlpMixer(
        img_size=img_size, patch_size=s.patch_size, num_blocks=s.num_blocks, embed_dim=s.hidden_dim,
        mlp_ratio=(s.tokens_mlp_dim / s.hidden_dim, s.channels_mlp_dim / s.hidden_dim),
        act_layer=partial(nn.GELU, approximate="tanh"),
    )


def _timm(name: str, img_size: int, sized: bool = True) -> nn.Module:
    """A timm model at `img_size` (a convnet takes any size: `sized=False`)."""
    import timm

    return timm.create_model(name, pretrained=False, **({"img_size": img_size} if sized else {}))


# Tables 2-3, img/s/core on TPUv3. Table 2's rows (448) were timed at their fine-tuning resolution.
PAPER_IMG_S_CORE: dict[str, dict[int, float]] = {
    "mixer-s32": {224: 11489}, "mixer-s16": {224: 3994}, "mixer-b32": {224: 4208}, "mixer-b16": {224: 1384},
    "mixer-l32": {224: 1314}, "mixer-l16": {224: 419, 448: 105}, "mixer-h14": {224: 194, 448: 40},
    "vit-b16": {224: 861}, "vit-l16": {224: 280, 448: 32}, "vit-h14": {224: 87, 448: 15},
    "bit-r50x1": {224: 2159}, "bit-r152x2": {224: 356}, "bit-r152x4": {448: 26},
}


def _contenders() -> dict[str, Contender]:
    found = {}
    for variant in VARIANTS:
        key = variant_key(variant)
        patch = VARIANTS[variant]["patch_size"]
        found[f"mixer-{key}"] = Contender(f"mixer-{key}", f"Mixer-{variant}", patch,
                                          partial(_ours, variant), PAPER_IMG_S_CORE.get(f"mixer-{key}", {}))
        found[f"timm-mixer-{key}"] = Contender(f"timm-mixer-{key}", f"timm Mixer-{variant}", patch,
                                               partial(_timm_mixer, variant))
        for layout in TOKEN_MIXING[1:]:  # the same Mixer, its token mixing computed another way
            found[f"mixer-{key}-{layout}"] = Contender(f"mixer-{key}-{layout}", f"Mixer-{variant} ({layout})", patch,
                                                       partial(_ours, variant, token_mixing=layout))
    for key, label, patch, timm_name in (
        ("vit-b16", "ViT-B/16", 16, "vit_base_patch16_224"),
        ("vit-l16", "ViT-L/16", 16, "vit_large_patch16_224"),
        ("vit-h14", "ViT-H/14", 14, "vit_huge_patch14_224"),
        ("bit-r50x1", "BiT-R50x1", None, "resnetv2_50x1_bit"),
        ("bit-r152x2", "BiT-R152x2", None, "resnetv2_152x2_bit"),
        ("bit-r152x4", "BiT-R152x4", None, "resnetv2_152x4_bit"),
    ):
        build = partial(_timm, timm_name, sized=patch is not None)
        found[key] = Contender(key, label, patch, build, PAPER_IMG_S_CORE.get(key, {}))
    return found


CONTENDERS = _contenders()
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODES = ("infer", "train")


# ---------------------------------------------------------------- what to run
@dataclass(frozen=True)
class Plan:
    contenders: list[Contender]
    res: list[int]
    modes: list[str]
    batches: list[int]
    device: torch.device
    precision: str
    compile: str | None  # a torch.compile mode; None: eager
    grad_checkpointing: bool
    warmup: int
    iters: int
    repeats: int
    memory_batches: tuple[int, int]
    clock: str
    memory: bool = True  # count training memory per image (MemTracker on fake tensors)


def list_overrides(overrides: list[str]) -> list[str]:
    """`models=a,b` as `models=[a,b]`: Hydra would read the bare comma list as a multirun sweep."""
    out = []
    for o in overrides:
        key, eq, value = o.partition("=")
        if eq and key in ("models", "res", "modes", "batch_sizes", "memory_batches") and not value.startswith("["):
            o = f"{key}=[{value}]"
        out.append(o)
    return out


def plan_from_config(cfg: DictConfig) -> Plan:
    """The checks of names and of their combinations, before anything is built or timed; the
    schema has checked each value."""
    unknown = [n for n in cfg.models if n not in CONTENDERS]
    if unknown:
        raise UserError(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(CONTENDERS)}")
    if cfg.precision not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, not {cfg.precision!r}")
    modes = list(cfg.modes)
    if set(modes) - set(MODES):
        raise UserError(f"modes must be a list drawn from {', '.join(MODES)}, not {modes}")
    res = list(cfg.res)
    contenders = [CONTENDERS[n] for n in cfg.models]
    for r in res:
        for c in contenders:
            if c.patch and r % c.patch:
                raise UserError(
                    f"resolution {r} does not suit {c.label} (patch {c.patch}); use a multiple of {c.patch}"
                )
    device = pick_device(str(cfg.device))
    batches = list(cfg.batch_sizes) if cfg.batch_sizes else _default_batches(device)
    iters = cfg.iters if cfg.iters is not None else (1 if device.type == "cpu" else 10)
    if cfg.clock not in CLOCKS or (cfg.clock == "cpu" and device.type != "cpu"):
        raise UserError(f"clock must be wall, or cpu when timing on a CPU, not {cfg.clock!r}")
    return Plan(contenders, res, modes, sorted(set(batches)), device, str(cfg.precision), compile_mode(cfg.compile),
                bool(cfg.grad_checkpointing), cfg.warmup, iters, cfg.repeats, tuple(cfg.memory_batches),
                str(cfg.clock), bool(cfg.memory))


def _default_batches(device: torch.device) -> list[int]:
    return [4, 8] if device.type == "cpu" else [32, 64, 128, 256, 512]


# ---------------------------------------------------------------- measuring
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(plan: Plan):
    return torch.autocast(plan.device.type, dtype=torch.bfloat16, enabled=plan.precision == "bf16")


def prepare(contender: Contender, res: int, plan: Plan) -> nn.Module:
    model = contender.build(res).to(plan.device)
    if plan.grad_checkpointing:
        model.set_grad_checkpointing(True)  # ours and every timm model have it
    if plan.compile:
        model.compile(mode=plan.compile)  # compiled on the first (untimed, warm-up) call of each shape and mode
    return model


def make_step(model: nn.Module, mode: str, batch: int, res: int, plan: Plan) -> Callable[[], None]:
    """One inference forward, or one training step (forward, cross-entropy, backward, AdamW)."""
    x = torch.randn(batch, 3, res, res, device=plan.device)
    if mode == "infer":
        model.eval()

        def step():
            with torch.inference_mode(), _autocast(plan):
                model(x)

        return step
    model.train()
    y = torch.randint(0, 1000, (batch,), device=plan.device)
    # a tiny lr: timing only, weights barely move; fused on a GPU, as training runs it
    adamw = partial(torch.optim.AdamW, lr=1e-6)
    opt = adamw(model.parameters(), **fused_on_cuda(adamw, plan.device))

    def step():
        with _autocast(plan):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_steps(step: Callable[[], None], n: int, device: torch.device, clock: str = "wall") -> float:
    """Seconds for n steps. The "cpu" clock counts this process's CPU time only: on a machine
    shared with other jobs and one thread, it leaves out the time spent waiting for a core."""
    now = CLOCKS[clock]
    _sync(device)
    start = now()
    for _ in range(n):
        step()
    _sync(device)
    return now() - start


def _out_of_memory(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def sweep(plan: Plan, res: int, mode: str, progress: Callable[[str], None]) -> dict[tuple[str, int], float]:
    """Best img/s of every (model, batch): samples interleaved across models, warm-up excluded.
    A model that runs out of memory at a batch size is not tried at larger ones."""
    models = {c.name: prepare(c, res, plan) for c in plan.contenders}
    best: dict[tuple[str, int], float] = {}
    too_big: set[str] = set()
    for batch in plan.batches:
        steps = {}
        for name, model in models.items():
            if name in too_big:
                continue
            try:
                steps[name] = make_step(model, mode, batch, res, plan)
                for _ in range(plan.warmup):
                    steps[name]()
            except RuntimeError as e:
                if not _out_of_memory(e):
                    raise
                too_big.add(name)
                steps.pop(name, None)
                _free(plan.device)
        for r in range(plan.repeats):
            for name, step in steps.items():
                progress(f"{mode} {res}px batch {batch}: {name} (sample {r + 1}/{plan.repeats})")
                rate = batch * plan.iters / time_steps(step, plan.iters, plan.device, plan.clock)
                best[name, batch] = max(best.get((name, batch), 0.0), rate)
        del steps
        _free(plan.device)
    return best


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def flops_per_image(contender: Contender, res: int, mode: str) -> float:
    """FLOPs of one image (forward; forward + backward for training), counted by torch's
    FlopCounterMode on the meta device: no memory, no compute."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = contender.build(res)
        x = torch.empty(1, 3, res, res)
    counter = FlopCounterMode(display=False)
    with counter:
        if mode == "infer":
            with torch.no_grad():
                model.eval()(x)
        else:
            model.train()(x).sum().backward()
    return float(counter.get_total_flops())


def square_operands(n: int, device: torch.device, dtype: torch.dtype, layout: tuple[bool, bool]):
    """Two n x n operands; layout says which of them are stored column-major (transposed)."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return tuple(x.t().contiguous().t() if col_major else x for x, col_major in zip((a, b), layout))


def matmul_peak(device: torch.device, precision: str, clock: str = "wall", repeats: int = 5) -> float:
    """The device's achievable FLOP/s: the best of several large square matmuls in the benchmark's
    precision (the ceiling that "% of peak" compares against), in the operands' fastest memory
    layout and at the faster of two sizes: a CPU without bf16 instructions emulates bf16 matmuls at
    speeds 10x apart by layout, and its fastest layout loses 4x from n=1024 to n=2048."""
    dtype = PRECISIONS[precision]

    def seconds(n: int, layout: tuple[bool, bool], tries: int) -> float:
        a, b = square_operands(n, device, dtype, layout)
        a @ b  # warm-up
        return min(time_steps(lambda: a @ b, 1, device, clock) for _ in range(tries))

    layouts = [(False, False), (False, True), (True, False), (True, True)]
    fastest = min(layouts, key=lambda layout: seconds(256, layout, 2))
    sizes = (1024, 2048) if device.type == "cpu" else (4096, 8192)
    return max(2 * n**3 / seconds(n, fastest, repeats) for n in sizes)


def train_memory(contender: Contender, res: int, plan: Plan) -> dict[str, float]:
    """Peak memory of a training step (weights, gradients, AdamW state, activations), counted on
    fake tensors by torch's MemTracker: exact tensor bytes, no compute, on any device type
    (torch keeps no allocator statistics for CPUs). Per image = the peak's growth from the
    first to the second of `memory_batches`, divided by the difference in batch size."""
    peaks = [_peak_train_bytes(contender, res, plan, b) for b in plan.memory_batches]
    b0, b1 = plan.memory_batches
    per_image = (peaks[1] - peaks[0]) / (b1 - b0)
    return {"mib_per_image": per_image / 2**20, "peak_mib": peaks[1] / 2**20, "at_batch": b1}


def _peak_train_bytes(contender: Contender, res: int, plan: Plan, batch: int) -> float:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    with torch.device("meta"):  # timm's constructors call .item(), which fake tensors refuse
        model = contender.build(res)
    if plan.grad_checkpointing:
        model.set_grad_checkpointing(True)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device=plan.device).train()
        opt = torch.optim.AdamW(model.parameters())
        x = torch.randn(batch, 3, res, res, device=plan.device)
        y = torch.randint(0, 1000, (batch,), device=plan.device)
        tracker = MemTracker()
        tracker.track_external(model, opt)
        with tracker:
            for i in range(2):  # the second step has the optimizer state from the first
                with _autocast(plan):
                    loss = F.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if i == 0:
                    tracker.reset_mod_stats()
        snapshot = tracker.get_tracker_snapshot("peak")
    return float(sum(per_device["Total"] for per_device in snapshot.values()))


# ---------------------------------------------------------------- results
def per_device_divisor(device: torch.device) -> int:
    """The paper counts per TPUv3 core; here per GPU, or per CPU core (thread) on a CPU."""
    return torch.get_num_threads() if device.type == "cpu" else 1


def best_rows(plan: Plan, res: int, mode: str, rates: dict[tuple[str, int], float], peak: float) -> list[dict]:
    """One row per model: the batch size with the highest throughput, as in the paper."""
    rows = []
    for c in plan.contenders:
        measured = {b: v for (n, b), v in rates.items() if n == c.name}
        if not measured:
            rows.append({"model": c.name, "label": c.label, "res": res, "mode": mode, "error": "out of memory"})
            continue
        batch = max(measured, key=measured.get)
        flops = flops_per_image(c, res, mode)
        img_s = measured[batch]
        row = {
            "model": c.name, "label": c.label, "res": res, "mode": mode, "batch": batch, "img_s": img_s,
            "img_s_per_device": img_s / per_device_divisor(plan.device), "gflop_per_image": flops / 1e9,
            "achieved_tflop_s": flops * img_s / 1e12, "fraction_of_matmul_peak": flops * img_s / peak,
            "img_s_by_batch": {str(b): v for b, v in sorted(measured.items())},
            "paper_img_s_core": c.paper.get(res) if mode == "infer" else None,
        }
        if mode == "train" and plan.memory:
            row["memory"] = train_memory(c, res, plan)
        rows.append(row)
    return rows


def _rate(rows: list[dict], model: str, res: int, mode: str) -> float | None:
    return next((r["img_s"] for r in rows if (r["model"], r["res"], r["mode"]) == (model, res, mode) and "img_s" in r),
                None)


def claims(rows: list[dict]) -> list[dict]:
    """The paper's claims as ratios of throughputs measured in this run, beside the paper's ratio."""
    out = []
    present = {r["model"] for r in rows}
    for (mixer, other), reason in (
        (("mixer-b16", "vit-b16"), "Mixer vs ViT"),
        (("mixer-l16", "vit-l16"), "Mixer vs ViT"),
        (("mixer-h14", "vit-h14"), "Mixer vs ViT"),
    ) + tuple(((f"mixer-{k}", f"timm-mixer-{k}"), "ours vs timm") for k in map(variant_key, VARIANTS)) + tuple(
        ((f"mixer-{k}-{layout}", f"mixer-{k}"), f"token mixing {layout} vs {TOKEN_MIXING[0]}")
        for k in map(variant_key, VARIANTS) for layout in TOKEN_MIXING[1:]
    ):
        if not {mixer, other} <= present:
            continue
        for res in sorted({r["res"] for r in rows}):
            for mode in MODES:
                a, b = _rate(rows, mixer, res, mode), _rate(rows, other, res, mode)
                if a and b:
                    pa, pb = (CONTENDERS[n].paper.get(res) for n in (mixer, other))
                    out.append({"claim": f"{reason}: {mixer} / {other} img/s ({mode}, {res}px)", "measured": a / b,
                                "paper": pa / pb if pa and pb and mode == "infer" else None, "expected": "> 1"})
    resolutions = sorted({r["res"] for r in rows})
    for model in sorted(present):
        for lo, hi in zip(resolutions, resolutions[1:]):
            for mode in MODES:
                a, b = _rate(rows, model, lo, mode), _rate(rows, model, hi, mode)
                if a and b:
                    paper = CONTENDERS[model].paper
                    linear = (hi / lo) ** 2  # the number of patches grows with the area
                    out.append({
                        "claim": f"time {hi}px / {lo}px: {model} ({mode})", "measured": a / b,
                        "paper": paper[lo] / paper[hi] if lo in paper and hi in paper and mode == "infer" else None,
                        "expected": f"> {linear:g} (quadratic)" if model.startswith("vit") else f"{linear:g} (linear)",
                    })
    return out


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_tables(report: dict) -> None:
    """One table per mode (inference, training), then the claims; every number is also in the JSON."""
    per = "img/s/core" if report["device"]["type"] == "cpu" else "img/s/GPU"
    setting = ", ".join([report["precision"]] + [f"compiled ({report['compile']})"] * bool(report["compile"])
                        + ["grad checkpointing"] * report["grad_checkpointing"]
                        + ["CPU-time clock"] * (report["plan"]["clock"] == "cpu"))
    for mode in MODES:
        rows = [r for r in report["results"] if r["mode"] == mode]
        if not rows:
            continue
        title = f"{mode} on {report['device']['name']} ({setting})"
        table = Table(title=title, title_style="bold", box=box.SIMPLE_HEAD)
        columns = ["model", "res", "batch", "img/s", per, "GFLOP", "TFLOP/s", "%peak"]
        columns += ["MiB/img"] if mode == "train" else ["paper"]
        for col in columns:
            table.add_column(col, justify="left" if col == "model" else "right")
        for r in rows:
            if "error" in r:
                table.add_row(r["label"], str(r["res"]), "-", r["error"], *["-"] * (len(columns) - 4))
                continue
            last = (_fmt(r.get("memory", {}).get("mib_per_image"), ".1f") if mode == "train"
                    else _fmt(r["paper_img_s_core"], ",.0f"))
            table.add_row(r["label"], str(r["res"]), str(r["batch"]), f"{r['img_s']:.1f}",
                          f"{r['img_s_per_device']:.1f}", f"{r['gflop_per_image']:.1f}",
                          f"{r['achieved_tflop_s']:.3f}", f"{100 * r['fraction_of_matmul_peak']:.0f}%", last)
        console.print(table)
    console.print("GFLOP per image (forward; forward + backward for training); %peak against the matmul peak "
                  f"measured here, {report['matmul_peak_tflop_s']:.3f} TFLOP/s; paper: img/s/core on TPUv3 "
                  "(Tables 2-3); MiB/img: training memory per extra image.", highlight=False)
    if report["claims"]:
        title = "Ratios measured in this run: the paper's claims, ours against timm, the layouts"
        table = Table(title=title, title_style="bold", box=box.SIMPLE_HEAD)
        for col in ("claim", "measured", "paper", "expected"):
            table.add_column(col, justify="left" if col == "claim" else "right")
        for c in report["claims"]:
            table.add_row(c["claim"], f"{c['measured']:.2f}", _fmt(c["paper"], ".2f"), c["expected"])
        console.print(table)
    console.print(f"results: [bold]{report['results_path']}[/]", highlight=False)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def run_benchmark(cfg: DictConfig, progress: bool = True) -> dict:
    """Measure, print the tables, write results.json in a new run directory; returns the report."""
    plan = plan_from_config(cfg)
    with torch_threads(None if cfg.threads is None else int(cfg.threads)):
        report = measure(plan, cfg, progress)
    with Run(cfg, "benchmark") as run:
        report["results_path"] = str(run.path / "results.json")
        run.finish(report)
    print_tables(report)
    return report


def measure(plan: Plan, cfg: DictConfig, progress: bool) -> dict:
    """The report of the plan's sweeps: the rows, the claims they support and what they ran on."""
    torch.manual_seed(0)
    started = _dt.datetime.now().isoformat(timespec="seconds")
    status = console.status("measuring the matmul peak") if progress else nullcontext()
    with status:
        update = status.update if progress else lambda _: None
        peak = matmul_peak(plan.device, plan.precision, plan.clock)
        rows = []
        for res in plan.res:
            for mode in plan.modes:
                rates = sweep(plan, res, mode, update)
                update(f"counting FLOPs and memory at {res}px ({mode})")
                rows += best_rows(plan, res, mode, rates, peak)
        # measured again at the end: a shared machine may have been busier at the start
        peak = max(peak, matmul_peak(plan.device, plan.precision, plan.clock))
    for r in rows:
        if "img_s" in r:
            r["fraction_of_matmul_peak"] = r["achieved_tflop_s"] * 1e12 / peak
    return {
        "started": started, "torch": torch.__version__,
        "device": {"type": plan.device.type, "name": _device_name(plan.device),
                   "per_device_divisor": per_device_divisor(plan.device)},
        "precision": plan.precision, "compile": plan.compile, "grad_checkpointing": plan.grad_checkpointing,
        "plan": {"res": plan.res, "modes": plan.modes, "batches": plan.batches, "warmup": plan.warmup,
                 "iters": plan.iters, "repeats": plan.repeats, "memory_batches": list(plan.memory_batches),
                 "memory": plan.memory,
                 "clock": plan.clock},
        "matmul_peak_tflop_s": peak / 1e12, "results": rows, "claims": claims(rows),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
