"""torch.compile's modes, as `trainer.compile` and `mixer benchmark compile=` name them."""
from __future__ import annotations

# torch._inductor.list_mode_options(); reduce-overhead replays CUDA graphs, max-autotune also times
# alternative matmul and convolution kernels (minutes of compiling)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_mode(compile: bool | str) -> str | None:
    """`compile` as the torch.compile mode it names: true is torch's "default", false eager (None)."""
    if compile is True:
        return COMPILE_MODES[0]
    return compile or None


def compiled_as(compile: bool | str) -> str:
    """How a run's summary says it ran: "" eager, ", compiled", or ", compiled (reduce-overhead)"."""
    mode = compile_mode(compile)
    if mode is None:
        return ""
    return ", compiled" if mode == COMPILE_MODES[0] else f", compiled ({mode})"
