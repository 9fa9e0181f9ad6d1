"""A run told back: its curves as ``loss.png``, a few lines of numbers, several runs side by side.

Everything comes from what a run already writes in its output folder: ``metrics.jsonl`` (a line per
log step, validation, rank growth, and the run's closing numbers) and the newest checkpoint's
``trainer_state.json`` (the settings). matplotlib is imported only when a picture is drawn, and
drawn with its Agg canvas (no display needed). Drawing never stops a run: a failure is one warning.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from smolora.errors import SmoLoRAError, reason
from smolora.log import warn

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
TENSORBOARD_DIR = "tensorboard"


@dataclass
class Curves:
    """One run's metrics, a value per step (a step logged twice, as after a resume, keeps its last)."""

    folder: Path
    train: dict[int, float] = field(default_factory=dict)  # step -> mean training loss since the last log
    lr: dict[int, float] = field(default_factory=dict)
    tokens_per_s: dict[int, float] = field(default_factory=dict)
    eval: dict[int, float] = field(default_factory=dict)  # step -> validation loss
    ranks: dict[int, int] = field(default_factory=dict)  # steps done -> the rank the adapter grew to
    best: tuple[int, float] | None = None  # early stopping: the step kept and its validation loss
    summary: dict = field(default_factory=dict)  # the run's closing numbers ("run_seconds" ...)

    @property
    def name(self) -> str:
        return self.folder.resolve().name or str(self.folder)

    def best_eval(self) -> tuple[int, float] | None:
        if self.best is not None:
            return self.best
        return min(self.eval.items(), key=lambda kv: kv[1]) if self.eval else None


def read_curves(folder: str | Path) -> Curves:
    """A run folder's ``metrics.jsonl`` as curves. A line that is not JSON is an error naming it,
    except a torn last line (a killed run), which is skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SmoLoRAError(f"{folder}: not a run folder (no such folder)")
    path = folder / METRICS_FILE
    if not path.is_file():
        raise SmoLoRAError(f"{path}: not found; is {folder} the output folder of a `smolora train` run?")
    curves = Curves(folder)
    lines = path.read_text(errors="replace").splitlines()
    for number, line in enumerate(lines, 1):
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict):
                raise ValueError("not an object")
            _add_entry(curves, entry)
        except (ValueError, TypeError) as error:
            if number == len(lines):  # written while the run was killed
                continue
            raise SmoLoRAError(f"{path}:{number}: not a metrics line ({reason(error)[:80]})") from None
    if not curves.train and not curves.eval:
        raise SmoLoRAError(f"{path}: holds no logged step yet")
    return curves


def _add_entry(curves: Curves, entry: dict) -> None:
    step = int(entry["step"])
    if "loss" in entry:
        curves.train[step] = float(entry["loss"])
        if entry.get("learning_rate") is not None:
            curves.lr[step] = float(entry["learning_rate"])
        if entry.get("tokens_per_s") is not None:
            curves.tokens_per_s[step] = float(entry["tokens_per_s"])
    if "eval_loss" in entry:
        curves.eval[step] = float(entry["eval_loss"])
    if "rank" in entry:
        curves.ranks[step] = int(entry["rank"])
    if "best_step" in entry:
        curves.best = (int(entry["best_step"]), float(entry["best_eval_loss"]))
    if "run_seconds" in entry:
        curves.summary = entry


def _line(points: dict) -> tuple[list, list]:
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def _figure(rows: int = 1):
    """A figure on matplotlib's Agg canvas, without pyplot (no global state, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    if rows == 1:
        return fig, fig.subplots()
    return fig, fig.subplots(rows, 1, sharex=True, height_ratios=[3, 1])


def _save_png(fig, path: Path) -> Path:
    from smolora.paths import publish

    return publish(path, lambda tmp: fig.savefig(tmp, format="png"), folder=False)


def draw_run(curves: Curves, path: Path | None = None) -> Path:
    """``loss.png``: training loss per logged step, validation loss, the learning rate on the right
    axis, each rank growth a dotted line, the best validation loss a star."""
    fig, ax = _figure()
    if curves.train:
        ax.plot(*_line(curves.train), color="tab:blue", lw=1.6, marker="." if len(curves.train) < 40 else None,
                label="training loss")  # fmt: skip
    if curves.eval:
        ax.plot(*_line(curves.eval), color="tab:orange", lw=1.6, marker="o", label="validation loss")
    best = curves.best_eval()
    if best is not None and curves.eval:
        ax.plot(*best, marker="*", ms=14, color="tab:red", ls="none", label=f"best validation {best[1]:.4f}")
    previous = run_settings(curves.folder).get("lora_config", {}).get("r") if curves.ranks else None
    for step, rank in sorted(curves.ranks.items()):  # grown before step ``step + 1`` ran
        ax.axvline(step + 0.5, color="tab:purple", ls=":", lw=1.2)
        grown = f"rank {previous}→{rank}" if isinstance(previous, int) else f"rank {rank}"
        previous = rank
        ax.annotate(grown, (step + 0.5, 1), xycoords=("data", "axes fraction"), xytext=(3, -12),
                    textcoords="offset points", color="tab:purple", fontsize=9)  # fmt: skip
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if curves.lr:
        right = ax.twinx()
        right.plot(*_line(curves.lr), color="tab:gray", ls="--", lw=1.0, label="learning rate")
        right.set_ylabel("learning rate", color="tab:gray")
        right.tick_params(axis="y", colors="tab:gray")
        right.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        right.set_ylim(bottom=0)
        more = right.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels, loc="upper right", fontsize=9)
    last = _line(curves.train)[1][-1] if curves.train else None
    ax.set_title(f"{curves.name}: " + ", ".join(_headline(curves, last)), fontsize=11)
    return _save_png(fig, path or curves.folder / PLOT_FILE)


def _headline(curves: Curves, last: float | None) -> list[str]:
    parts = [f"last training loss {last:.4f}"] if last is not None else []
    if (best := curves.best_eval()) is not None:
        parts.append(f"best validation {best[1]:.4f} at step {best[0]}")
    return parts


_failed: set[Path] = set()  # folders whose plot already failed once: one warning per run


def draw_safely(folder: str | Path) -> Path | None:
    """Redraw ``folder/loss.png`` from its metrics; a failure (no matplotlib, a full disk) is one
    warning per run, and the run goes on."""
    folder = Path(folder)
    try:
        if not (folder / METRICS_FILE).is_file():
            return None
        return draw_run(read_curves(folder))
    except Exception as error:  # a picture is never worth a run
        if folder not in _failed:
            _failed.add(folder)
            warn(f"{folder / PLOT_FILE}: not drawn ({reason(error)[:160]}); training goes on")
        return None


def draw_compare(runs: list[Curves], path: Path) -> Path:
    """Several runs in one picture: each its colour, training loss solid, validation loss dashed with
    dots; the learning rates below."""
    fig, (ax, lr_ax) = _figure(rows=2)
    for i, curves in enumerate(runs):
        color = f"C{i % 10}"
        if curves.train:
            ax.plot(*_line(curves.train), color=color, lw=1.6, label=f"{curves.name} training")
        if curves.eval:
            ax.plot(*_line(curves.eval), color=color, lw=1.2, ls="--", marker="o", ms=4,
                    label=f"{curves.name} validation")  # fmt: skip
        if curves.lr:
            lr_ax.plot(*_line(curves.lr), color=color, lw=1.2)
        for step in curves.ranks:
            ax.axvline(step + 0.5, color=color, ls=":", lw=1.0)
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, loc="upper right")
    ax.set_title(" vs ".join(c.name for c in runs), fontsize=11)
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("optimizer step")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    lr_ax.grid(alpha=0.3)
    return _save_png(fig, path)


# ---- the closing numbers a run writes, and the report's lines -------------------------------


def peak_memory(device) -> dict:
    """The process's peak resident memory and, on a GPU, its peak allocation (MiB)."""
    import torch

    out = {}
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        out["peak_rss_mib"] = round(rss / (2**20 if sys.platform == "darwin" else 1024), 1)
    except (ImportError, OSError):
        pass
    if getattr(device, "type", device) == "cuda" and torch.cuda.is_available():
        out["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def closing_entry(steps: int, tokens: int, seconds: float, train_examples: int, val_examples: int, device) -> dict:
    """The metrics line a run ends with: what the report says of time, speed, memory and data."""
    return {
        "step": steps,
        "run_seconds": round(seconds, 2),
        "tokens": tokens,
        "run_tokens_per_s": round(tokens / max(seconds, 1e-9), 1),
        "train_examples": train_examples,
        "val_examples": val_examples,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **peak_memory(device),
    }


def run_settings(folder: Path) -> dict:
    """The settings the run recorded in its newest complete checkpoint ({} where there is none)."""
    from smolora import checkpoint as ckpt

    found = ckpt.list_checkpoints(folder)
    if not found:
        return {}
    try:
        return ckpt.read_run_info(found[-1])
    except (OSError, ValueError):
        return {}


def _settings_line(info: dict) -> str:
    train, lora, data = info.get("train_config", {}), info.get("lora_config", {}), info.get("data_config", {})
    if not train:
        return "settings: unknown (no complete checkpoint)"
    targets = lora.get("target_modules")
    targets = ",".join(sorted(targets)) if isinstance(targets, list) else targets
    grow = f", grown to {train['grow_rank'][-1]}" if train.get("grow_rank") else ""
    return (
        f"settings: base {info.get('base_model') or 'embedded SmolLM2-135M-Instruct'}; LoRA r {lora.get('r')}{grow}, "
        f"alpha {lora.get('lora_alpha')}, targets {targets}; lr {train.get('learning_rate')} "
        f"{train.get('lr_scheduler_type')}, warmup {train.get('warmup_steps')}; batch "
        f"{train.get('per_device_train_batch_size')} x {train.get('gradient_accumulation_steps')} accumulation; "
        f"max_length {data.get('max_length')}; seed {train.get('seed')}"
    )


def _files(folder: Path) -> list[str]:
    from smolora import checkpoint as ckpt

    names = [n for n in ("adapter_checkpoint", "final_merged") if (folder / n).is_dir()]
    names += [f"checkpoints/{p.name}" for p in ckpt.list_checkpoints(folder)[-1:]]
    names += [n for n in ("config.yaml", METRICS_FILE, PLOT_FILE, TENSORBOARD_DIR) if (folder / n).exists()]
    return names


def _human_seconds(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def describe_run(curves: Curves) -> list[str]:
    """The run in a few lines: settings, data, losses, time and speed, memory, files."""
    s, lines = curves.summary, [f"run {curves.folder}"]
    lines.append(_settings_line(run_settings(curves.folder)))
    if s:
        lines.append(
            f"data: {s.get('train_examples')} training examples, {s.get('val_examples')} validation; "
            f"{s.get('tokens'):,} tokens trained on"
        )
    steps, losses = _line(curves.train)
    if losses:
        lines.append(f"training loss: {losses[0]:.4f} at step {steps[0]} -> {losses[-1]:.4f} at step {steps[-1]}")
    if (best := curves.best_eval()) is not None:
        kept = " (the adapter kept)" if curves.best is not None else ""
        lines.append(
            f"validation loss: best {best[1]:.4f} at step {best[0]}{kept}; last {_line(curves.eval)[1][-1]:.4f}"
        )
    if s:
        memory = f"peak RSS {s['peak_rss_mib']:.0f} MiB" if "peak_rss_mib" in s else "peak memory unknown"
        memory += f", peak GPU {s['peak_gpu_mib']:.0f} MiB" if "peak_gpu_mib" in s else ""
        lines.append(f"time: {_human_seconds(s['run_seconds'])}, {s['run_tokens_per_s']:.0f} tokens/s; {memory}")
    else:
        lines.append("time: the run has not finished (no closing line in metrics.jsonl)")
    lines.append(f"files: {', '.join(_files(curves.folder))}")
    return lines


def compare_table(runs: list[Curves]) -> list[str]:
    """A row per run of its final numbers, then the settings in which the runs differ."""
    head = ["run", "steps", "last loss", "best val (step)", "tokens/s", "time", "peak RSS"]
    rows = []
    for c in runs:
        s, best = c.summary, c.best_eval()
        rows.append(
            [
                c.name,
                str(max([*c.train, *c.eval], default=0)),
                f"{_line(c.train)[1][-1]:.4f}" if c.train else "-",
                f"{best[1]:.4f} ({best[0]})" if best else "-",
                f"{s['run_tokens_per_s']:.0f}" if s else "-",
                _human_seconds(s["run_seconds"]) if s else "-",
                f"{s['peak_rss_mib']:.0f} MiB" if "peak_rss_mib" in s else "-",
            ]
        )
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    table = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [head, *rows]]
    return table + _differences(runs)


def _differences(runs: list[Curves]) -> list[str]:
    flat = []
    for c in runs:
        info = run_settings(c.folder)
        flat.append(
            {
                f"{k}": v
                for section in ("train_config", "lora_config", "data_config")
                for k, v in info.get(section, {}).items()
                if k != "output_dir"
            }
        )
    keys = sorted({k for f in flat for k in f if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1})
    return [f"differs: {k}: " + " | ".join(f"{c.name}={f.get(k)!r}" for c, f in zip(runs, flat)) for k in keys]


# ---- TensorBoard ----------------------------------------------------------------------------


REPORT_TO = ("none", "tensorboard")


def check_report_to(report_to: str | None) -> None:
    """``report_to`` is none or tensorboard; tensorboard needs its package (not a SmoLoRA dependency)."""
    if report_to in (None, "", "none"):
        return
    if report_to not in REPORT_TO:
        raise SmoLoRAError(f"report_to must be one of {', '.join(REPORT_TO)} (got {report_to!r})")
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise SmoLoRAError(
            "--report-to tensorboard: the tensorboard package is not installed (pip install tensorboard)"
        ) from None


def tensorboard_mirror(folder: Path) -> Callable[[dict], None]:
    """A writer of each metrics line as TensorBoard scalars under ``folder/tensorboard``."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(folder / TENSORBOARD_DIR))

    def mirror(entry: dict) -> None:
        step = int(entry.get("step", 0))
        for key, value in entry.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                if math.isfinite(value):
                    group = "eval" if key.startswith(("eval_", "best_")) else "run" if "run_" in key else "train"
                    writer.add_scalar(f"{group}/{key}", value, step)
        writer.flush()

    return mirror
