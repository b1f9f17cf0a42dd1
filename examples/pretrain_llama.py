"""Pretrain a Llama with a low-precision recipe on FSDP2, DDP or one plain process.

    torchrun --standalone --nproc_per_node=2 examples/pretrain_llama.py           # short CPU/GPU job
    torchrun --nproc_per_node=4 examples/pretrain_llama.py --model 1b --recipe fp8-smooth \\
        --seq-len 2048 --batch-size 4 --steps 1000 --compile --out runs/1b-fp8
    mpirun -n 2 python examples/pretrain_llama.py                                 # same, via MPI
    python examples/pretrain_llama.py --model 1b --recipe fp8 --parallel none --compile  # one GPU, no wrapper

With no flags it trains the ``tiny`` model (``20m`` on a GPU) on the default corpus (the
Python standard library's source, byte-level tokens) for a short run on whatever the machine
has: CPU processes over gloo in fp32, or GPUs over NCCL with bf16 compute.

``--recipe`` (``lpdist.nn.recipes``) switches on together: the low-precision linear layers
and Smooth-SwiGLU (``lpdist.nn.convert``), FP8 gradient communication (``lpdist.comm``:
FSDP2 reduce-scatter or DDP comm hook) and low-precision AdamW moments (``lpdist.optim``).
``--ablate PART [PART ...]`` switches parts of the recipe back off, to measure what each one
contributes: ``layers`` (keep ``nn.Linear`` and the plain SwiGLU), ``grad_comm`` (the plain
FSDP2/DDP gradient reduction), ``all_gather`` (the plain FSDP2 parameter all-gather; only the
``fp8-gather`` recipe gathers parameters in FP8) and ``moments`` (fp32 AdamW state).

Every ``--time-every`` steps (default 10) the step is timed in three phases, logged in
``metrics.jsonl`` as ``time_fwd_bwd_s`` (forward, loss and backward, including the gradient
communication that backward leaves exposed), ``time_optim_s`` (optimizer step and zero_grad)
and ``time_other_s`` (the rest: batch, gradient clipping, loss reduction, telemetry), with
their sum ``time_step_s``. On a GPU the phases are CUDA events on the current stream, read
with one synchronize at the end of a timed step; on a CPU ``time.perf_counter``. Untimed steps
record nothing and wait for nothing.

``--profile STEP`` records steps ``STEP .. STEP+2`` with ``torch.profiler`` on every process
(CPU and, on a GPU, CUDA activity; all three steps must run in this invocation, so ``STEP`` is
at most the last step, ``--stop-at`` or ``--steps``, minus 2; a resumed run that starts after
``STEP`` records nothing) and writes ``profile/rank<R>.json`` (a Chrome trace: open it in
Perfetto or chrome://tracing to see launches, kernels and communication on their streams) and
``profile/rank<R>.txt`` (the operators with the most device time, else CPU time). On a GPU the
device time per step of the three is also split into compute and communication, and the part of
the communication that no compute kernel overlaps (``lpdist.benchmark.kernel_time_breakdown``): at
the top of the table, and in ``metrics.jsonl`` as ``profile_busy_ms``, ``profile_compute_ms``,
``profile_communication_ms`` and ``profile_exposed_communication_ms`` on the last traced step,
with the kernel time per kind (``lpdist.benchmark.kernel_time_by_kind``: GEMMs, attention,
communication, optimizer, Triton, other) as ``profile_kernels_<kind>_ms``.

The last ``--val-fraction`` of the corpus (default 0.5%) is held out for the validation loss;
it must hold at least one window of ``--seq-len + 1`` tokens.

The run folder ``--out`` receives ``metrics.jsonl`` (one line per step and per evaluation),
``telemetry.jsonl`` (per-layer amax/saturation), ``loss.png``, ``amax.png`` and
``checkpoints/``. ``--resume`` continues from the latest checkpoint there, with the same or
another number of processes; the data stream continues where it stopped (the batch of a
step is a function of the seed and the number of samples consumed). The run must be the same:
model, ``--recipe`` and ``--ablate``, data (``--data``, ``--tokenizer``, ``--val-fraction``,
``--seq-len``, ``--seed``), global batch (``--batch-size`` x processes) and LR schedule
(``--steps``, ``--lr``, ``--warmup``); a checkpoint of another run is refused, naming the
entries that differ. Both JSONL logs are cut back to the step the run starts from (a resumed
run drops the records of steps after its checkpoint and a torn last line; a fresh run starts
them empty).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from lpdist import checkpoint
from lpdist.benchmark import kernel_time_breakdown, kernel_time_by_kind, trace_kernels
from lpdist.comm import TRANSPORTS, fastest_transport
from lpdist.data import Corpus, ShortStreamError, WindowSampler, load_corpus
from lpdist.dist import destroy, init
from lpdist.models import PRESETS, Llama, flops_per_token, preset
from lpdist.monitor import LayerMonitor, MetricsLog, Throughput, memory_gib, plot_amax, plot_runs
from lpdist.nn import Recipe, convert, get_recipe, recipes, set_tracking
from lpdist.optim import AdamW as LowPrecisionAdamW
from lpdist.optim import clip_coefficient

# Peak learning rate by model size (AdamW, batch ~0.1-0.5M tokens; Llama/Pythia-like values).
DEFAULT_LR = {"tiny": 3e-3, "20m": 1e-3, "125m": 6e-4, "350m": 3e-4, "1b": 3e-4, "3b": 3e-4, "8b": 3e-4}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
#: Share of the corpus held out at its end for the validation loss (``--val-fraction``); the
#: checkpoints written before the option existed held out this share.
DEFAULT_VAL_FRACTION = 0.005
#: The JSONL logs of a run folder, cut back to the starting step when a run (re)starts.
RUN_LOGS = ("metrics.jsonl", "telemetry.jsonl")
#: ``--ablate`` parts: the recipe fields each one resets to the bf16/fp32 baseline.
ABLATIONS = {
    "layers": {"linear": "bf16", "smooth_swiglu": None, "fp4_recipe": None},
    "grad_comm": {"grad_comm": None},
    "all_gather": {"all_gather": None},
    "moments": {"moments": "fp32"},
}


#: ``--parallel`` choices: FSDP2, DDP, or the plain model in a single process.
PARALLEL_MODES = ("fsdp", "ddp", "none")
#: The ``--parallel`` modes that keep fp32 parameters and compute in bf16 under autocast.
AUTOCAST_MODES = ("ddp", "none")
#: torch.compile modes a run may choose for its blocks.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: The modes that replay compiled blocks from CUDA graphs.
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(PRESETS), help="model preset (default: tiny on CPU, 20m on GPU)")
    parser.add_argument("--recipe", default="bf16", choices=sorted(recipes), help="low-precision recipe (default: bf16)")
    parser.add_argument("--data", help="text file, directory of text files or .bin tokens (default: Python stdlib source)")
    parser.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION,
                        help="share of the corpus held out at its end for the validation loss, in (0, 1); "
                             "the tail must hold a window of --seq-len + 1 tokens (default: %(default)s)")
    parser.add_argument("--tokenizer", default="byte", choices=("byte", "bpe"), help="for text data (bpe needs `pip install lpdist[bpe]`, tokenizers >= 0.15.1)")
    parser.add_argument("--vocab-size", type=int, help="pad the model vocabulary to this size (default: tokenizer's, rounded up to 64)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of the whole run (sets the LR schedule)")
    parser.add_argument("--stop-at", type=int, help="end this invocation after this step (saving a checkpoint); resume later")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per process per step")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default: 128 on CPU, 1024 on GPU)")
    parser.add_argument("--lr", type=float, help="peak learning rate (default: by model size)")
    parser.add_argument("--warmup", type=int, help="linear warm-up steps, then cosine to lr/10 (default: steps/20)")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm (0: off)")
    parser.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    parser.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                        help="torch.compile mode of the blocks (with --compile); reduce-overhead replays "
                             "each block from CUDA graphs: measured faster for the fp8 recipes on small "
                             "models (125m), slower for bf16 and the FP4 recipes, and slower for every "
                             "recipe at 1b (graphs re-recorded on every call under FSDP2)")
    parser.add_argument("--eval-every", type=int, default=100, help="validation loss every N steps and at the end (0: end only)")
    parser.add_argument("--eval-batches", type=int, default=8,
                        help="global batches of the held-out tail in each validation loss (fewer if the tail is shorter)")
    parser.add_argument("--ckpt-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    parser.add_argument("--monitor-every", type=int, default=25, help="per-layer amax telemetry every N steps (0: off)")
    parser.add_argument("--out", type=Path, help="run folder (default: runs/llama-MODEL-RECIPE)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    parser.add_argument("--parallel", default="fsdp", choices=PARALLEL_MODES,
                        help="fsdp: FSDP2 fully_shard per block (bf16 parameters in compute); ddp: "
                             "DistributedDataParallel (fp32 parameters, bf16 autocast); none: one process, the "
                             "plain model (fp32 parameters, bf16 autocast): no wrapper and no parameter or "
                             "gradient copies, the fastest way to train on one GPU (default: %(default)s)")
    parser.add_argument("--compute-dtype", choices=sorted(DTYPES), help="matmul dtype (default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--reduce-dtype", default="fp32", choices=sorted(DTYPES), help="FSDP2 gradient reduce dtype")
    parser.add_argument("--grad-comm-transport", default="auto", choices=("auto", *TRANSPORTS),
                        help="transport of the recipe's FP8 gradient communication (default auto: p2p when all "
                             "ranks share one machine with GPU peer access, else all_to_all)")
    parser.add_argument("--max-bad-steps", type=int, default=10, help="stop after this many steps with a non-finite loss")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ablate", nargs="+", default=[], metavar="PART",
                        help=f"switch these parts of the recipe off: {', '.join(ABLATIONS)}")
    parser.add_argument("--time-every", type=int, default=10, help="time the step phases every N steps (0: off)")
    parser.add_argument("--profile", type=int, metavar="STEP",
                        help="trace steps STEP..STEP+2 with torch.profiler; all three must run in this invocation "
                             "(STEP <= last step - 2, the last step being --stop-at or --steps)")
    args = parser.parse_args(argv)
    try:
        args.ablate = validate_ablations(args.recipe, args.ablate)
    except ValueError as error:
        parser.error(str(error))
    if args.compile_mode != "default" and not args.compile:
        parser.error(f"--compile-mode {args.compile_mode} needs --compile")
    for name in ("steps", "batch_size", "seq_len", "stop_at", "vocab_size", "profile", "eval_batches"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    for name in ("eval_every", "ckpt_every", "monitor_every", "warmup", "max_bad_steps", "time_every", "seed"):
        value = getattr(args, name)
        if value is not None and value < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {value}")
    if not 0.0 < args.val_fraction < 1.0:
        parser.error(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    args.stop_at = min(args.stop_at or args.steps, args.steps)
    if args.profile is not None:
        last_start = args.stop_at - StepProfiler.STEPS + 1
        if last_start < 1:
            parser.error(f"--profile traces {StepProfiler.STEPS} steps, but this invocation runs only "
                         f"{args.stop_at} (--stop-at/--steps): it needs at least {StepProfiler.STEPS} steps")
        if args.profile > last_start:
            parser.error(f"--profile {args.profile} traces steps {args.profile}..{args.profile + StepProfiler.STEPS - 1}, "
                         f"past the last step {args.stop_at} of this invocation (--stop-at/--steps): "
                         f"choose STEP in 1..{last_start}")
    return args


def ablatable_parts(recipe: str | Recipe) -> list[str]:
    """The ``--ablate`` parts that ``recipe`` actually switches on (bf16 has none)."""
    baseline = get_recipe("bf16")
    recipe = get_recipe(recipe)
    return [part for part, fields in ABLATIONS.items()
            if any(getattr(recipe, name) != getattr(baseline, name) for name in fields)]


def validate_ablations(recipe: str, parts: list[str]) -> list[str]:
    """``parts`` sorted and de-duplicated; ValueError for an unknown part or one that
    ``recipe`` does not use (ablating it would silently change nothing)."""
    unknown = [part for part in parts if part not in ABLATIONS]
    if unknown:
        raise ValueError(f"--ablate: unknown part(s) {unknown}; choose from {list(ABLATIONS)}")
    unused = [part for part in parts if part not in ablatable_parts(recipe)]
    if unused:
        raise ValueError(f"--ablate: recipe {recipe} has no low-precision {', '.join(unused)} to switch off "
                         f"(it has: {ablatable_parts(recipe) or 'none'})")
    return sorted(set(parts))


def run_recipe(args: argparse.Namespace) -> Recipe:
    """The ``--recipe`` with the ``--ablate`` parts reset to the bf16/fp32 baseline."""
    changes = {name: value for part in args.ablate for name, value in ABLATIONS[part].items()}
    return get_recipe(args.recipe).with_options(**changes)


class StepProfiler:
    """``torch.profiler`` over ``STEPS`` consecutive steps from ``first`` (``None``: off); the
    trace and a summary table go to ``folder`` when the last of them ends. On a GPU the table
    starts with the device time per step split by ``lpdist.benchmark.kernel_time_breakdown``
    (busy, compute, communication and the communication no compute kernel overlaps), which
    ``device_times`` also returns for the metrics of that step."""

    STEPS = 3

    def __init__(self, first: int | None, folder: Path, rank: int, device: torch.device) -> None:
        self.first, self.folder, self.rank = first, folder, rank
        self.activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            self.activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profile = None
        self._device_times: dict[str, float] = {}

    def before(self, step: int) -> None:
        if step == self.first:
            self.profile = torch.profiler.profile(activities=self.activities)
            self.profile.start()

    def after(self, step: int) -> None:
        if self.profile is None or step != self.first + self.STEPS - 1:
            return
        self.profile.stop()  # synchronizes the device before collecting its events
        self.folder.mkdir(parents=True, exist_ok=True)
        trace = self.folder / f"rank{self.rank}.json"
        self.profile.export_chrome_trace(str(trace))
        on_gpu = len(self.activities) > 1
        table = self.profile.key_averages().table(
            sort_by="self_cuda_time_total" if on_gpu else "self_cpu_time_total", row_limit=40)
        if on_gpu:
            kernels = trace_kernels(trace)
            times = kernel_time_breakdown(kernels, steps=self.STEPS)
            kinds = kernel_time_by_kind(kernels, steps=self.STEPS)
            self._device_times = {**{f"profile_{key}_ms": value / 1e3 for key, value in times.items()},
                                  **{f"profile_kernels_{kind}_ms": value / 1e3 for kind, value in kinds.items()}}
            table = ("device time per step (ms): " + ", ".join(f"{key} {value / 1e3:.2f}" for key, value in times.items())
                     + "\nkernel time per step by kind (ms): "
                     + ", ".join(f"{kind} {value / 1e3:.2f}" for kind, value in kinds.items()) + "\n\n" + table)
        (self.folder / f"rank{self.rank}.txt").write_text(table)
        self.profile = None

    def device_times(self) -> dict[str, float]:
        """``profile_<busy|communication|exposed_communication|compute>_ms`` and
        ``profile_kernels_<kind>_ms`` per step, once, after the last traced step on a GPU; else
        ``{}``."""
        times, self._device_times = self._device_times, {}
        return times


class StepTimer:
    """Phase times of every ``every``-th step (``every=0``: none).

    ``start(step)`` opens a step; ``mark(name)`` ends the interval since the previous mark and
    books it to phase ``name`` (``None``: to "other"); the last mark ends the step. ``times()``
    returns ``{"time_<name>_s": ..., "time_other_s": ..., "time_step_s": ...}`` for a timed
    step and ``{}`` otherwise. Marks are CUDA events on the current stream on a GPU (device
    time: a phase includes the time the GPU waited for the host in it; one synchronize, in
    ``times()``), ``time.perf_counter()`` readings on a CPU. Untimed steps do nothing.
    """

    def __init__(self, every: int, device: torch.device) -> None:
        self.every = every
        self.cuda = device.type == "cuda"
        self._marks: list[tuple[str | None, object]] = []
        self._active = False

    def start(self, step: int) -> None:
        self._active = self.every > 0 and step % self.every == 0
        self._marks = []
        self.mark(None)

    def mark(self, name: str | None) -> None:
        if not self._active:
            return
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._marks.append((name, event))
        else:
            self._marks.append((name, time.perf_counter()))

    def _seconds(self, begin: object, end: object) -> float:
        return begin.elapsed_time(end) / 1000 if self.cuda else end - begin

    def times(self) -> dict[str, float]:
        if not self._active:
            return {}
        if self.cuda:
            self._marks[-1][1].synchronize()
        (_, first), (_, last) = self._marks[0], self._marks[-1]
        phases: dict[str, float] = {}
        for (_, begin), (name, end) in zip(self._marks, self._marks[1:]):
            if name is not None:
                key = f"time_{name}_s"
                phases[key] = phases.get(key, 0.0) + self._seconds(begin, end)
        total = self._seconds(first, last)
        return {**phases, "time_other_s": total - sum(phases.values()), "time_step_s": total}


def fill_device_defaults(args: argparse.Namespace, device: torch.device) -> None:
    on_gpu = device.type == "cuda"
    args.model = args.model or ("20m" if on_gpu else "tiny")
    args.seq_len = args.seq_len or (1024 if on_gpu else 128)
    args.compute_dtype = args.compute_dtype or ("bf16" if on_gpu else "fp32")
    args.lr = args.lr if args.lr is not None else DEFAULT_LR[args.model]
    args.warmup = args.warmup if args.warmup is not None else max(1, args.steps // 20)
    args.out = args.out or Path("runs") / f"llama-{args.model}-{args.recipe}"


def learning_rate(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``lr / 10`` at ``steps``."""
    if step <= args.warmup:
        return args.lr * step / max(1, args.warmup)
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


def grad_comm_transport(args: argparse.Namespace, device: torch.device) -> str:
    """``--grad-comm-transport``, with ``auto`` resolved by ``lpdist.comm.fastest_transport`` (a
    collective: every rank calls it)."""
    return fastest_transport(device) if args.grad_comm_transport == "auto" else args.grad_comm_transport


def build_model(args: argparse.Namespace, vocab_size: int, device: torch.device, world_size: int) -> tuple[nn.Module, Llama]:
    """The Llama with the recipe's layers, compiled blocks and the FSDP2/DDP wrapper.
    Returns ``(model to train, the Llama inside it)``."""
    config = preset(args.model, vocab_size=vocab_size, max_seq_len=max(args.seq_len, PRESETS[args.model].max_seq_len))
    torch.manual_seed(args.seed)
    with torch.device(device):
        llama = Llama(config)
    recipe = run_recipe(args)
    summary = convert(llama, recipe)
    if dist.get_rank() == 0:
        print(summary, flush=True)
    if args.compile:
        for block in llama.layers:
            block.compile(mode=args.compile_mode)
    compute_dtype = DTYPES[args.compute_dtype]
    if args.parallel == "fsdp":
        policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=DTYPES[args.reduce_dtype])
        for block in llama.layers:
            fully_shard(block, mp_policy=policy)
        fully_shard(llama, mp_policy=policy)
        if recipe.grad_comm is not None and world_size > 1:
            from lpdist.comm import enable_fp8_reduce_scatter

            transport = grad_comm_transport(args, device)
            patched = enable_fp8_reduce_scatter(llama, fmt=recipe.grad_comm, transport=transport)
            if dist.get_rank() == 0:
                print(f"gradient reduce-scatter in {recipe.grad_comm} ({transport}) on {patched} FSDP modules",
                      flush=True)
        if recipe.all_gather is not None and world_size > 1:
            from lpdist.comm import enable_fp8_all_gather

            patched = enable_fp8_all_gather(llama, fmt=recipe.all_gather)
            if dist.get_rank() == 0:
                print(f"parameter all-gather in {recipe.all_gather} on {patched} FSDP modules", flush=True)
        return llama, llama
    if recipe.all_gather is not None and world_size > 1:
        raise SystemExit(f"recipe {recipe.name}: an FP8 parameter all-gather needs --parallel fsdp (DDP keeps "
                         "whole parameters on every rank)")
    if args.parallel == "none":
        return llama, llama
    model = DistributedDataParallel(llama, device_ids=[device.index] if device.type == "cuda" else None)
    if recipe.grad_comm is not None and world_size > 1:
        from lpdist.comm import DDPHookState, fp8_ddp_hook

        model.register_comm_hook(DDPHookState(fmt=recipe.grad_comm, transport=grad_comm_transport(args, device)),
                                 fp8_ddp_hook)
    return model, llama


def build_optimizer(model: nn.Module, args: argparse.Namespace, device: torch.device) -> torch.optim.Optimizer:
    """``torch.optim.AdamW`` (betas 0.9/0.95) with weight decay on matrices only, given the
    recipe's low-precision moments by ``lpdist.optim.wrap`` unless they are fp32."""
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": matrices, "weight_decay": args.weight_decay}, {"params": vectors, "weight_decay": 0.0}]
    moments = run_recipe(args).moments
    optimizer = torch.optim.AdamW(
        groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda" and moments == "fp32"
    )
    if moments == "fp32":
        return optimizer
    from lpdist.optim import wrap

    return wrap(optimizer, moments=moments)


def autocast(args: argparse.Namespace, device: torch.device):
    """DDP and the plain model keep fp32 parameters: bf16 compute comes from autocast (FSDP2
    casts parameters)."""
    if args.parallel in AUTOCAST_MODES and args.compute_dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def clip_gradients(model: nn.Module, optimizer: torch.optim.Optimizer, max_norm: float) -> tuple[torch.Tensor, dict]:
    """The global gradient norm (before clipping) and the keyword arguments of the step that
    follows. torch optimizers: ``clip_grad_norm_`` scales the gradients in place (``max_norm``
    0: no clipping). lpdist's AdamW: the norm only; its fused step multiplies the gradients by
    ``clip_coefficient`` itself (no pass over the gradients of its own) and, the norm being
    finite exactly when every gradient is, skips its non-finite scan."""
    if not isinstance(optimizer, LowPrecisionAdamW):
        return total_norm(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm or math.inf)), {}
    norm = total_norm(torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]))
    return norm, {"grads_finite": True, **({"grad_scale": clip_coefficient(norm, max_norm)} if max_norm else {})}


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def begin_model_call(args: argparse.Namespace) -> None:
    """Marks the start of a forward of the whole model when the blocks are replayed from CUDA
    graphs (``torch.compiler.cudagraph_mark_step_begin``): the replays may then reuse the
    previous call's output buffers, and the blocks' forwards and backwards of one step are
    recorded as one generation instead of taking the slow path meant for unfinished backwards."""
    if args.compile and args.compile_mode in CUDA_GRAPH_MODES:
        torch.compiler.cudagraph_mark_step_begin()


def global_mean(value: torch.Tensor) -> torch.Tensor:
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / dist.get_world_size()


@torch.no_grad()
def evaluate(model: nn.Module, sampler: WindowSampler, args: argparse.Namespace, device: torch.device) -> float:
    """Mean loss over the first ``--eval-batches`` global batches of the held-out tail."""
    rank, world = dist.get_rank(), dist.get_world_size()
    global_batch = world * args.batch_size
    n_batches = max(1, min(args.eval_batches, sampler.n_windows // global_batch))
    model.eval()
    total = torch.zeros((), device=device)
    for index in range(n_batches):
        inputs, targets = sampler.batch(index * global_batch, rank, args.batch_size, device)
        begin_model_call(args)
        with autocast(args, device):
            total += next_token_loss(model(inputs), targets)
    model.train()
    return global_mean(total / n_batches).item()


def total_norm(norm: torch.Tensor) -> torch.Tensor:
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def split_sampler(corpus: Corpus, split: str, args: argparse.Namespace, **options: int | bool) -> WindowSampler:
    """A ``WindowSampler`` of ``--seq-len`` over the ``split`` (``"training"`` or
    ``"validation"``) of ``corpus``, with the sampler's ``options`` (``seed``, ``shuffle``).
    The sampler refuses a split shorter than one window of ``--seq-len + 1`` tokens; that
    becomes a SystemExit naming the split and the arguments to change."""
    tokens = {"training": corpus.train, "validation": corpus.val}[split]
    try:
        return WindowSampler(tokens, args.seq_len, **options)
    except ShortStreamError as error:
        raise SystemExit(short_split_advice(corpus, split, args)) from error


def short_split_advice(corpus: Corpus, split: str, args: argparse.Namespace) -> str:
    """Why ``split`` (``"training"`` or ``"validation"``) of ``corpus`` holds no window of
    ``--seq-len + 1`` tokens, and which arguments to change: ``--seq-len`` or ``--data`` when
    the whole corpus is too short for two windows, else ``--val-fraction`` (or ``--seq-len``)."""
    window, total = args.seq_len + 1, len(corpus.train) + len(corpus.val)
    if total < 2 * window:
        return (f"the corpus {corpus.source} has {total:,} tokens, too few for a training and a validation "
                f"window of --seq-len + 1 = {window} tokens each: lower --seq-len or use more --data")
    if split == "validation":
        # The smallest fraction, rounded up to 1e-4, whose tail int(total * fraction) holds a window.
        needed = math.ceil(window / total * 1e4) / 1e4
        shorter = f", or lower --seq-len to {len(corpus.val) - 1} or less" if len(corpus.val) > 1 else ""
        return (f"the validation split (the last --val-fraction {args.val_fraction} of the {total:,} tokens "
                f"of {corpus.source}) has {len(corpus.val):,} tokens, fewer than one window of --seq-len + 1 = "
                f"{window} tokens: raise --val-fraction to {needed:g} or more{shorter}")
    return (f"the training split ({len(corpus.train):,} of the {total:,} tokens of {corpus.source}) has "
            f"fewer than one window of --seq-len + 1 = {window} tokens: lower --val-fraction "
            f"({args.val_fraction}) or --seq-len")


def checkpoint_meta(args: argparse.Namespace, llama: Llama, corpus: Corpus, world_size: int) -> dict:
    """Entries that must match on resume: the model, the data stream (which windows, in which
    order, ``global_batch`` sequences per step) and the LR schedule. Everything else may change,
    e.g. the world size at the same global batch."""
    return {
        "model": dataclasses.asdict(llama.config),
        "recipe": args.recipe,
        "ablate": args.ablate,
        "seq_len": args.seq_len,
        "seed": args.seed,
        "data": corpus.source,
        "tokenizer": corpus.tokenizer,  # of a token file: the one that made it, whatever --tokenizer says
        "val_fraction": args.val_fraction,  # sets the training stream's length, hence its window order
        "global_batch": world_size * args.batch_size,  # --batch-size x processes
        "steps": args.steps,  # with lr and warmup: the LR schedule
        "lr": args.lr,
        "warmup": args.warmup,
    }


#: Entries added to ``checkpoint_meta`` after checkpoints were first written, with the value
#: that a checkpoint lacking one stood for (``None``: unknown, the entry is not checked).
LATER_META_ENTRIES = {"val_fraction": DEFAULT_VAL_FRACTION, "tokenizer": None, "global_batch": None, "steps": None,
                      "lr": None, "warmup": None}


def resume_expectations(meta: dict, ckpt_root: Path) -> dict:
    """The entries of ``meta`` that the latest checkpoint under ``ckpt_root`` must match. One
    saved before an entry of ``LATER_META_ENTRIES`` existed matches a run with the value it
    stood for (one without ``val_fraction`` held out the default share) and is not checked
    where that value is unknown."""
    saved = checkpoint.read_meta(checkpoint.latest(ckpt_root))["meta"]
    unchecked = {key for key, implied in LATER_META_ENTRIES.items()
                 if key not in saved and (implied is None or meta[key] == implied)}
    return {key: value for key, value in meta.items() if key not in unchecked}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    rank, world_size, _, device = init()
    try:
        return train(args, rank, world_size, device)
    finally:
        destroy()


def train(args: argparse.Namespace, rank: int, world_size: int, device: torch.device) -> dict:
    if args.parallel == "none" and world_size > 1:
        raise SystemExit(f"--parallel none trains the plain model in one process, but this job has {world_size} "
                         "processes: use --parallel fsdp or ddp, or start one process")
    fill_device_defaults(args, device)
    is_main = rank == 0
    ckpt_root = args.out / "checkpoints"
    if checkpoint.latest(ckpt_root) is not None and not args.resume:
        raise SystemExit(f"{args.out} already holds checkpoints: pass --resume to continue, or choose another --out")

    # Rank 0 tokenizes (and caches) the corpus first; the others then memory-map the cache.
    if is_main:
        corpus = load_corpus(args.data, tokenizer=args.tokenizer, val_fraction=args.val_fraction)
    dist.barrier()
    if not is_main:
        corpus = load_corpus(args.data, tokenizer=args.tokenizer, val_fraction=args.val_fraction)
    train_sampler = split_sampler(corpus, "training", args, seed=args.seed)
    val_sampler = split_sampler(corpus, "validation", args, shuffle=False)
    vocab_size = args.vocab_size or 64 * math.ceil(corpus.vocab_size / 64)
    if vocab_size < corpus.vocab_size:
        raise SystemExit(f"--vocab-size {vocab_size} is smaller than the tokenizer's vocabulary ({corpus.vocab_size})")

    model, llama = build_model(args, vocab_size, device, world_size)
    optimizer = build_optimizer(model, args, device)
    meta = checkpoint_meta(args, llama, corpus, world_size)

    step, samples_seen = 0, 0
    if args.resume and checkpoint.latest(ckpt_root) is not None:
        record = checkpoint.load(ckpt_root, model, optimizer, expect=resume_expectations(meta, ckpt_root))
        step, samples_seen = record["step"], record["meta"]["samples_seen"]
    metrics = MetricsLog(args.out / "metrics.jsonl") if is_main else None
    layer_monitor = None
    if is_main:
        for name in RUN_LOGS:  # records of steps this run will log again, or of an earlier run
            MetricsLog(args.out / name).truncate_after(step)
        if args.monitor_every:
            layer_monitor = LayerMonitor(model, args.out / "telemetry.jsonl", every=args.monitor_every, input_hooks=not args.compile)
    if layer_monitor is None:  # every rank: layer statistics only on the steps the monitor samples
        set_tracking(model, False)
    if is_main:
        print(describe_run(args, llama, corpus, world_size, device, step), flush=True)
        if args.profile is not None and args.profile <= step:
            print(f"--profile {args.profile}: this run resumes at step {step + 1}, after the first traced step; "
                  "no trace is written", file=sys.stderr, flush=True)

    tokens_per_step = world_size * args.batch_size * args.seq_len
    throughput = Throughput(flops_per_token(llama.config, args.seq_len), world_size, device)
    # A live bar on a terminal; in a log file (batch jobs) one plain line every 5% of the run.
    live = is_main and sys.stderr.isatty()
    progress = tqdm(total=args.stop_at, initial=step, disable=not live, dynamic_ncols=True, desc="train")
    line_every = max(1, args.stop_at // 20)
    timer = StepTimer(args.time_every, device)
    profiler = StepProfiler(args.profile, args.out / "profile", rank, device)
    bad_steps, last = 0, {}
    while step < args.stop_at:
        step += 1
        profiler.before(step)
        timer.start(step)
        lr = learning_rate(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        inputs, targets = train_sampler.batch(samples_seen, rank, args.batch_size, device)
        samples_seen += world_size * args.batch_size
        if layer_monitor:
            layer_monitor.start_step(step)
        begin_model_call(args)
        with autocast(args, device):
            loss = next_token_loss(model(inputs), targets)
        loss.backward()
        timer.mark("fwd_bwd")
        grad_norm, step_options = clip_gradients(model, optimizer, args.grad_clip)
        mean_loss = global_mean(loss)
        finite = bool(torch.isfinite(mean_loss) & torch.isfinite(grad_norm))
        timer.mark(None)
        if finite:
            optimizer.step(**step_options)
        optimizer.zero_grad(set_to_none=True)
        timer.mark("optim")
        throughput.tick(tokens_per_step)
        if layer_monitor:
            layer_monitor.end_step(step)
        timer.mark(None)
        profiler.after(step)

        last = {"step": step, "loss": mean_loss.item(), "lr": lr, "grad_norm": grad_norm.item(), "tokens": samples_seen * args.seq_len}
        last.update(throughput.rates(), **timer.times(), **profiler.device_times(), mem_gib=memory_gib(device))
        if not finite:
            bad_steps += 1
            last["skipped"] = True
        if is_main:
            metrics.log(last)
            progress.set_postfix_str(progress_line(last), refresh=False)
            progress.update(1)
            if not live and (step % line_every == 0 or step == args.stop_at):
                print(f"step {step}/{args.stop_at} | {progress_line(last)}", flush=True)
            if not finite:
                progress.write(f"step {step}: non-finite loss {last['loss']} / grad norm {last['grad_norm']}; update skipped")
        if bad_steps > args.max_bad_steps:
            raise SystemExit(
                f"stopping at step {step}: {bad_steps} steps had a non-finite loss or gradient norm "
                f"(limit --max-bad-steps {args.max_bad_steps}); lower --lr or try --recipe bf16"
            )
        if (args.eval_every and step % args.eval_every == 0) or step == args.steps:
            val_loss = evaluate(model, val_sampler, args, device)
            if is_main:
                metrics.log({"step": step, "val_loss": val_loss})
                progress.write(f"step {step}: validation loss {val_loss:.4f}")
        if (args.ckpt_every and step % args.ckpt_every == 0) or step == args.stop_at:
            checkpoint.save(ckpt_root, step, model, optimizer, meta={**meta, "samples_seen": samples_seen})
    progress.close()

    if is_main:
        if layer_monitor:
            layer_monitor.close()
        write_plots(args.out)
        print(f"done: step {step}, loss {last.get('loss', float('nan')):.4f}; run folder {args.out}", flush=True)
    return last


def progress_line(record: dict) -> str:
    parts = [f"loss {record['loss']:.4f}"]
    if "tokens_per_s" in record:
        parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
    if "mfu" in record:
        parts.append(f"MFU {100 * record['mfu']:.1f}%")
    parts.append(f"mem {record['mem_gib']:.2f} GiB")
    return " | ".join(parts)


def describe_run(args: argparse.Namespace, llama: Llama, corpus: Corpus, world_size: int, device: torch.device, step: int) -> str:
    n_params = sum(p.numel() for p in llama.parameters())  # DTensor.numel() is the global size
    return (
        f"Llama {args.model} ({n_params / 1e6:.1f}M params, vocab {llama.config.vocab_size}), recipe {args.recipe}"
        f"{' without ' + ', '.join(args.ablate) if args.ablate else ''}, "
        f"{args.parallel} x {world_size} on {device.type}, {args.compute_dtype} compute; data {corpus.source} "
        f"({len(corpus.train):,} train / {len(corpus.val):,} val {corpus.tokenizer} tokens); "
        f"batch {args.batch_size}x{args.seq_len} per process; steps {step + 1}..{args.stop_at} of {args.steps}"
    )


def write_plots(out: Path) -> None:
    try:
        plot_runs([out], out / "loss.png", labels=[out.name])
        telemetry = out / "telemetry.jsonl"
        if telemetry.exists():
            plot_amax(telemetry, out / "amax.png")
        else:  # no telemetry in this run: an amax.png there would show an earlier run's
            (out / "amax.png").unlink(missing_ok=True)
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)


if __name__ == "__main__":
    main()
    sys.exit(0)
