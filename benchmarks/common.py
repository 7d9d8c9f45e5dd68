"""Shared pieces of the benchmarks: models, timing, peak memory, hardware and tables.

Every benchmark measures the fast path of the package against a naive path *in the same run*,
reports wall time as the median of several runs after a warm-up, and peak memory:

* CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated when the measurement began;
* CPU: the rise of the process's peak resident set size (``VmHWM`` in ``/proc/self/status``,
  reset through ``/proc/self/clear_refs`` at the start of each measurement, after ``malloc_trim``
  has returned the heap's free memory, so that the starting level is the live set).
  ``bench_memory`` measures each model in a fresh process with glibc serving every large block
  by ``mmap``, the cleanest figure; the in-process figures of the other benchmarks can hide
  memory that the heap reuses.

Nothing here asserts a speed: the numbers are printed, and ``benchmarks/RESULTS.md`` records them.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("LIGHTNING_ROME_DATA", str(REPO.parent / "shared" / "data"))
os.environ.setdefault("LIGHTNING_ROME_CACHE", str(REPO / ".cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from torch import nn  # noqa: E402

__all__ = [
    "MODELS",
    "REPO",
    "BenchModel",
    "PeakMemory",
    "Settings",
    "Timing",
    "add_common_args",
    "build_model",
    "counterfact_requests",
    "fact_model_or_none",
    "fmt_bytes",
    "fmt_s",
    "git_commit",
    "hardware",
    "machine_line",
    "param_bytes",
    "print_table",
    "random_second_moment",
    "settings_from_args",
    "sync",
    "time_interleaved",
    "time_runs",
]

#: Model choices. ``gpt2-small``: GPT-2 small's config (124M parameters) with random weights;
#: ``gpt2-mini``: the same vocabulary and layout scaled down (4 layers, width 256) for ``--quick``;
#: ``tiny``: 2 layers of width 32 (the smoke test); ``fact``: the small trained fact model.
MODELS = ("gpt2-small", "gpt2-mini", "tiny", "fact")


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


@dataclass
class Settings:
    """What every benchmark needs to know about the run."""

    quick: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    runs: int = 5
    warmup: int = 1
    model: str = "gpt2-small"
    seed: int = 0
    threads: int | None = None
    json_out: Path | None = None

    @property
    def dtype_name(self) -> str:
        return {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(self.dtype, str(self.dtype))


def add_common_args(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options every benchmark (and the runner) accepts."""
    ap.add_argument("--quick", action="store_true",
                    help="small workloads on a scaled-down GPT-2 (gpt2-mini); under 2 minutes")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda[:i]")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                    help="model dtype (statistics and solves stay in float32/float64)")
    ap.add_argument("--runs", type=int, default=5,
                    help="timed runs per measurement; the median is reported (default 5; 3 "
                         "with --quick unless given)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs (default 1)")
    ap.add_argument("--model", choices=MODELS, default=None,
                    help="gpt2-small (default), gpt2-mini (default with --quick), tiny, fact")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: torch's, or 1 on an oversubscribed "
                         "machine)")
    ap.add_argument("--json", dest="json_out", type=Path, default=None,
                    help="also write the results to this JSON file")
    return ap


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Validate the common options and apply the thread count."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available on this machine")
    if args.runs < 1:
        raise SystemExit("--runs must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    elif device.type == "cpu" and _oversubscribed():
        # OpenMP threads that wait on each other across a busy machine run several times
        # slower than one thread; say so in the output (machine_line shows the count).
        torch.set_num_threads(1)
        print("note: the machine is oversubscribed; running with 1 torch thread (pass "
              "--threads to choose)", flush=True)
    model = args.model or ("gpt2-mini" if args.quick else "gpt2-small")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    runs = 3 if args.quick and args.runs == 5 else args.runs  # --quick: 3 unless chosen
    s = Settings(quick=args.quick, device=device, dtype=dtype, runs=runs,
                 warmup=max(0, args.warmup), model=model, seed=args.seed, threads=args.threads,
                 json_out=args.json_out)
    return s


def _oversubscribed() -> bool:
    """The 1-minute load average exceeds the core count."""
    try:
        return os.getloadavg()[0] > (os.cpu_count() or 1)
    except OSError:
        return False


def _malloc_trim() -> None:
    """Give the heap's free memory back to the system (glibc), so that the resident set size
    is the live set. No-op off glibc."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# --------------------------------------------------------------------------------------------
# Models and data
# --------------------------------------------------------------------------------------------


@dataclass
class BenchModel:
    """A model to benchmark on, with its tokenizer and a one-line description."""

    model: nn.Module
    tokenizer: Any
    description: str
    name: str
    kb: Any = None  # the fact model's knowledge base

    @property
    def n_layers(self) -> int:
        return int(self.model.config.n_layer)

    @property
    def d_ff(self) -> int:
        c = self.model.config
        return int(c.n_inner or 4 * c.n_embd)


def _gpt2_tokenizer() -> Any:
    from lightning_rome.models import load_tokenizer
    from lightning_rome.utils.paths import data_path

    return load_tokenizer(data_path("gpt2-tokenizer", what="GPT-2 tokenizer folder"))


def build_model(name: str, device: torch.device, dtype: torch.dtype = torch.float32,
                seed: int = 0) -> BenchModel:
    """A model with random weights (seeded) from GPT-2 small's config, scaled as ``name`` says,
    with the real GPT-2 tokenizer; or the fact model (see :func:`fact_model_or_none`).

    Raises:
        RuntimeError: ``name == "fact"`` and the fact model is not cached.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    from lightning_rome.utils.paths import data_path

    if name == "fact":
        fm, note = fact_model_or_none()
        if fm is None:
            raise RuntimeError(note)
        model = fm.model.to(device=device, dtype=dtype).eval()
        return BenchModel(model, fm.tokenizer, _describe(model, "the trained fact model"),
                          name, kb=fm.kb)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {MODELS}")
    config = GPT2Config.from_json_file(
        str(data_path("gpt2-tokenizer/gpt2-small-config.json", what="GPT-2 small config")))
    if name == "gpt2-mini":
        config.n_layer, config.n_embd, config.n_head = 4, 256, 4
    elif name == "tiny":
        config.n_layer, config.n_embd, config.n_head, config.n_positions = 2, 32, 2, 128
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).to(device=device, dtype=dtype).eval()
    what = {"gpt2-small": "GPT-2 small config", "gpt2-mini": "GPT-2 small config scaled to "
            "4 layers x 256", "tiny": "tiny GPT-2 (2 layers x 32)"}[name]
    return BenchModel(model, _gpt2_tokenizer(), _describe(model, f"{what}, random weights"),
                      name)


def _describe(model: nn.Module, what: str) -> str:
    n = sum(p.numel() for p in model.parameters())
    c = model.config
    dtype = next(model.parameters()).dtype
    return (f"{what}: {c.n_layer} layers, d={c.n_embd}, vocab {c.vocab_size}, "
            f"{n / 1e6:.1f}M parameters ({fmt_bytes(param_bytes(model))}, "
            f"{str(dtype).removeprefix('torch.')})")


def fact_model_or_none() -> tuple[Any, str]:
    """The cached fact model (``lightning_rome.testing.get_fact_model()``), or ``None`` and the
    reason. It is never trained here: a benchmark row that needs it is skipped instead."""
    try:
        from lightning_rome.testing import fact_model as fm_mod
        from lightning_rome.utils import io
    except ImportError as e:  # pragma: no cover - the module is being finalised elsewhere
        return None, f"fact model unavailable ({e})"
    config = fm_mod.FactModelConfig()
    folder = io.cache_dir("fact_models") / config.key()
    if not folder.is_dir():
        return None, (f"fact model not cached under {folder.parent} (build it once with "
                      "lightning_rome.testing.get_fact_model()); row skipped")
    try:
        return fm_mod.get_fact_model(config), ""
    except Exception as e:  # a corrupt cache, an API change: skip the row, say why
        return None, f"fact model could not be loaded ({type(e).__name__}: {e}); row skipped"


def param_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters (and buffers)."""
    return sum(t.numel() * t.element_size()
               for t in [*model.parameters(), *model.buffers()])


def counterfact_requests(n: int, tokenizer: Any, *, start: int = 0,
                         split: str = "counterfact/counterfact-train.json") -> list[Any]:
    """The first ``n`` COUNTERFACT edit requests (read as plain JSON from the local file, either
    schema) whose subject the tokenizer can locate."""
    from lightning_rome.requests import EditRequest
    from lightning_rome.tokens import SubjectNotFoundError, subject_span
    from lightning_rome.utils.paths import data_path

    raw = json.loads(data_path(split, what="COUNTERFACT file").read_text())
    out = []
    for i, rec in enumerate(raw[start:], start):
        try:
            if "requested_rewrite" in rec:
                req = EditRequest.from_dict(rec)
            else:  # the reduced form: the prompt holds the subject itself
                subject, prompt = rec["subject"], rec["prompt"]
                if subject not in prompt or "{" in prompt or "}" in prompt:
                    continue
                req = EditRequest(prompt.replace(subject, "{}", 1), subject, rec["target_new"],
                                  target_true=rec.get("ground_truth"),
                                  case_id=rec.get("case_id", i))
            subject_span(tokenizer, req.prompt, req.subject)
        except (KeyError, ValueError, SubjectNotFoundError):
            continue
        out.append(req)
        if len(out) == n:
            return out
    raise ValueError(f"only {len(out)} usable requests in {split}, {n} wanted")


def random_second_moment(d: int, seed: int = 0, device: torch.device | str = "cpu",
                         rank: int | None = None) -> torch.Tensor:
    """A random, well-conditioned positive-definite ``(d, d)`` float64 matrix standing in for
    C = E[k kᵀ] (so that statistics are not part of an edit's timing)."""
    g = torch.Generator().manual_seed(seed)
    r = rank or min(d, 512)
    A = torch.randn(d, r, generator=g, dtype=torch.float64) / r ** 0.5  # (d, r)
    C = A @ A.T + 0.5 * torch.eye(d, dtype=torch.float64)  # (d, d), eigenvalues ≥ 0.5
    return C.to(device)


# --------------------------------------------------------------------------------------------
# Timing and memory
# --------------------------------------------------------------------------------------------


def sync(device: torch.device | str) -> None:
    """Wait for queued GPU work (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Wall times of the timed runs (seconds)."""

    times: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def spread(self) -> str:
        return f"{min(self.times):.3g}-{max(self.times):.3g}"


def time_runs(fn: Callable[[], Any], settings: Settings, *, runs: int | None = None,
              warmup: int | None = None) -> tuple[Timing, Any]:
    """Run ``fn`` ``warmup`` times untimed, then ``runs`` times timed; returns the timing and the
    last result."""
    result = None
    for _ in range(settings.warmup if warmup is None else warmup):
        result = fn()
    sync(settings.device)
    times = []
    for _ in range(settings.runs if runs is None else runs):
        t0 = time.perf_counter()
        result = fn()
        sync(settings.device)
        times.append(time.perf_counter() - t0)
    return Timing(times), result


def time_interleaved(fns: Sequence[Callable[[], Any]], settings: Settings, *,
                     runs: int | None = None, warmup: int | None = None
                     ) -> list[tuple[Timing, Any]]:
    """Like :func:`time_runs` for several functions, run in turn (``a b a b ...``) so that a
    change of load on a shared machine hits them alike and their ratio stays meaningful.
    Returns ``(timing, last result)`` per function, in order."""
    results: list[Any] = [None] * len(fns)
    for _ in range(settings.warmup if warmup is None else warmup):
        for i, fn in enumerate(fns):
            results[i] = fn()
    sync(settings.device)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(settings.runs if runs is None else runs):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            results[i] = fn()
            sync(settings.device)
            times[i].append(time.perf_counter() - t0)
    return [(Timing(t), r) for t, r in zip(times, results)]


def _status_kb(field_name: str) -> int:
    text = Path("/proc/self/status").read_text()
    m = re.search(rf"^{field_name}:\s+(\d+)\s+kB", text, re.M)
    if m is None:
        raise OSError(f"{field_name} not in /proc/self/status")
    return int(m.group(1)) * 1024


class PeakMemory:
    """Peak memory above the starting level while the block runs.

    CUDA: ``max_memory_allocated`` − allocated at entry. CPU: peak RSS − RSS at entry, with the
    peak reset at entry through ``/proc/self/clear_refs``; where that is not possible (not Linux)
    ``peak`` is ``None``. ``retained`` (what is still held at exit, after a garbage collection)
    is measured unless ``retained=False``.

    Example:
        >>> with PeakMemory("cpu") as mem:
        ...     x = torch.ones(10_000_000)
        >>> mem.peak > 30e6
        True
    """

    def __init__(self, device: torch.device | str, *, retained: bool = True) -> None:
        self.device = torch.device(device)
        self.track_retained = retained
        self.peak: int | None = None
        self.retained: int | None = None
        self._start = 0

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        _malloc_trim()
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            self._start = _status_kb("VmRSS")
        except OSError:
            self._start = -1
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._start
            if self.track_retained:
                gc.collect()
                self.retained = torch.cuda.memory_allocated(self.device) - self._start
            return
        if self._start < 0:
            return
        with contextlib.suppress(OSError):
            self.peak = _status_kb("VmHWM") - self._start
            if self.track_retained:
                gc.collect()
                self.retained = _status_kb("VmRSS") - self._start


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def fmt_s(seconds: float | None) -> str:
    """Seconds with 3 significant figures and a unit that fits."""
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.3g} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.3g} ms"
    if seconds >= 3600:
        return f"{seconds / 3600:.3g} h"
    return f"{seconds:.3g} s"


def fmt_bytes(n: int | float | None) -> str:
    """Bytes in MiB/GiB (binary units)."""
    if n is None:
        return "n/a"
    sign = "-" if n < 0 else ""
    n = abs(n)
    if n >= 1 << 30:
        return f"{sign}{n / (1 << 30):.2f} GiB"
    if n >= 1 << 20:
        return f"{sign}{n / (1 << 20):.1f} MiB"
    return f"{sign}{n / 1024:.0f} KiB"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]],
                title: str | None = None) -> str:
    """Print (and return) a Markdown table."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    lines = []
    if title:
        lines.append(f"\n{title}\n")
    lines.append("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def git_commit() -> str:
    """``git rev-parse --short HEAD`` (``+dirty`` with uncommitted changes), or ``unknown``."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, check=True,
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, capture_output=True, text=True, timeout=10).stdout
        return sha + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def hardware(device: torch.device | str = "cpu") -> dict[str, Any]:
    """CPU model, core count, load, torch version and thread count (and the GPU, on CUDA)."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }
    with contextlib.suppress(OSError):
        info["load"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def machine_line(device: torch.device | str = "cpu") -> str:
    """One line describing the machine, for the top of each benchmark's output."""
    h = hardware(device)
    gpu = f", GPU {h['gpu']}" if "gpu" in h else ""
    line = (f"machine: {h['cpu']}, {h['cores']} cores, {h['threads']} torch threads, "
            f"load {h.get('load', '?')}{gpu}; torch {h['torch']}; commit {h['commit']}; "
            f"{h['date']}")
    if torch.device(device).type == "cpu" and _oversubscribed():
        line += (f"\nwarning: the machine is oversubscribed (load above {h['cores']} cores): "
                 "timings are slower and noisier than on a quiet machine")
    return line


def write_json(path: Path | None, name: str, payload: dict[str, Any]) -> None:
    """Merge ``{name: payload}`` (with the hardware) into a JSON results file."""
    if path is None:
        return
    from lightning_rome.utils.io import atomic_write_json

    data = json.loads(path.read_text()) if path.is_file() else {}
    data[name] = {**payload, "hardware": hardware()}
    atomic_write_json(path, data)


@contextlib.contextmanager
def section(title: str) -> Iterator[None]:
    """Print a titled section and how long it took."""
    print(f"\n=== {title} ===", flush=True)
    t0 = time.perf_counter()
    yield
    print(f"--- {title}: {fmt_s(time.perf_counter() - t0)} in all", flush=True)
