"""Atomic, resumable checkpoints: adapter (PEFT format) + full training state, no pickle.

Layout of ``OUTPUT/checkpoints/step-NNNNNN/``::

    adapter_config.json, adapter_model.safetensors   the adapter, loadable by PEFT
    optimizer.safetensors                            optimizer tensors + torch RNG states
    trainer_state.json                               step, epoch, data position, config, fingerprints,
                                                     Python/NumPy RNG states, optimizer hyperparameters
    checksums.json                                   SHA-256 of each file above
    COMPLETE                                         written last: only such folders are resumed

A checkpoint is written into a temporary sibling folder, every file fsynced, then renamed into
place, so a crash at any moment leaves earlier checkpoints intact and never a partial one that
resume would pick. What happens to a checkpoint after that (a disk error, a careless edit) is
caught by its checksums: resume verifies a checkpoint before using it, and passes over a newest one
that does not verify, saying which file is bad, to the newest one that does. A checkpoint is never
written with non-finite adapter weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from smolora.errors import SmoLoRAError, load_mismatch
from smolora.log import warn
from smolora.paths import MARKER, publish, unreadable_safetensors

STATE_FILE = "trainer_state.json"
TENSOR_FILE = "optimizer.safetensors"
CHECKSUM_FILE = "checksums.json"
CHECKPOINT_FILES = ("adapter_config.json", "adapter_model.safetensors", TENSOR_FILE, STATE_FILE)
STEP_DIR = re.compile(r"^step-(\d{6,})$")
# Settings that may change between a run and its resume without changing the result (its length,
# LENGTH_FIELDS, only under a constant learning rate: see check_compatible).
LENGTH_FIELDS = {"max_steps", "num_train_epochs"}
# the same training either way, to fp32 rounding (weight_codes: exactly; fast: the plain path's sums)
RESUME_SAFE_FIELDS = {
    "output_dir",
    "logging_steps",
    "save_steps",
    "save_total_limit",
    "device",
    "eval_steps",
    "weight_codes",
    "fast",
} | LENGTH_FIELDS


@dataclass
class TrainState:
    """Where a run is: ``step`` optimizer updates done, the next micro-batch is ``cursor`` of ``epoch``."""

    step: int = 0
    epoch: int = 0
    cursor: int = 0
    losses: list[float] = field(default_factory=list)  # per optimizer step
    loss_scale: dict | None = None  # fp16's gradient scaler state
    # early stopping: the lowest validation loss so far, its step and adapter weights, and the
    # evaluations since; ``stopped`` once patience ran out
    best_eval: float | None = None
    best_step: int = 0
    best_weights: dict[str, torch.Tensor] | None = None
    evals_since_best: int = 0
    stopped: bool = False


def fingerprint_examples(examples) -> str:
    h = hashlib.sha256()
    for ex in examples:
        h.update(np.asarray(ex.input_ids, dtype=np.int64).tobytes())
        h.update(np.asarray(ex.labels, dtype=np.int64).tobytes())
    return h.hexdigest()[:32]


def fingerprint_model(model) -> str:
    """Config plus a sample of the input embedding: tells one base model from another cheaply."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    h = hashlib.sha256(json.dumps(base.config.to_diff_dict(), sort_keys=True, default=str).encode())
    emb = base.get_input_embeddings().weight.detach()
    h.update(emb.flatten()[:65536].float().cpu().numpy().tobytes())
    return h.hexdigest()[:32]


def safe_child(root: str | Path, *names: str) -> Path:
    """``root/names...``, refusing names that would leave ``root`` (``..``, absolute paths) or
    write through a symlink planted inside it."""
    root = Path(root)
    path = root.joinpath(*names)
    if any(Path(n).is_absolute() or ".." in Path(n).parts for n in names):
        raise SmoLoRAError(f"{path}: output names may not be absolute or contain '..'")
    probe = path
    while probe != root and probe != probe.parent:
        if probe.is_symlink():
            raise SmoLoRAError(f"{probe}: is a symlink inside the output folder; refusing to write through it")
        probe = probe.parent
    return path


def _optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_flat(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("state."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    for key, v in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_snapshot() -> tuple[dict, dict[str, torch.Tensor]]:
    py = random.getstate()
    npy = np.random.get_state()
    meta = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [npy[0], npy[1].tolist(), int(npy[2]), int(npy[3]), float(npy[4])],
    }
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    return meta, tensors


def rng_restore(
    meta: dict, tensors: dict[str, torch.Tensor], rank: int = 0, device: torch.device | None = None
) -> None:
    """Restore the RNG states; a data-parallel run's process ``rank`` takes its own torch states."""
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npy = meta["numpy"]
    np.random.set_state((npy[0], np.asarray(npy[1], dtype=np.uint32), npy[2], npy[3], npy[4]))
    own = tensors.get(f"rng.torch.rank{rank}", tensors["rng.torch"])
    torch.set_rng_state(own)
    if f"rng.cuda.rank{rank}" in tensors and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(tensors[f"rng.cuda.rank{rank}"], device)
    else:
        cuda = sorted(k for k in tensors if k.startswith("rng.cuda.") and ".rank" not in k)
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    # Verify rather than trust: a silently failed restore would break exact resume.
    if not torch.equal(torch.get_rng_state(), own):
        raise SmoLoRAError("checkpoint: torch RNG state did not restore")


def save_checkpoint(
    folder: Path,
    model,
    optimizer,
    state: TrainState,
    run_info: dict,
    process_rng: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a complete checkpoint atomically. ``run_info`` holds config and fingerprints;
    ``process_rng`` a data-parallel run's per-process RNG states. Refuses (``NonFiniteWeights``)
    an adapter holding NaN or inf: a checkpoint is always one worth resuming from."""
    bad = next((n for n, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()), None)
    if bad is not None:
        raise NonFiniteWeights(
            f"step {state.step}: the adapter holds non-finite values ({bad}); no checkpoint written. "
            "Lower the learning rate or clip gradients (max_grad_norm)"
        )

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp), safe_serialization=True)
        opt_tensors, opt_meta = _optimizer_to_flat(optimizer)
        rng_meta, rng_tensors = rng_snapshot()
        best = {f"best.{name}": w.detach().cpu().contiguous() for name, w in (state.best_weights or {}).items()}
        save_file({**opt_tensors, **rng_tensors, **(process_rng or {}), **best}, str(tmp / TENSOR_FILE))
        doc = {
            "step": state.step,
            "epoch": state.epoch,
            "cursor": state.cursor,
            "losses": state.losses,
            "loss_scale": state.loss_scale,
            "best_eval": state.best_eval,
            "best_step": state.best_step,
            "evals_since_best": state.evals_since_best,
            "stopped": state.stopped,
            "optimizer": opt_meta,
            "rng": rng_meta,
            **run_info,
        }
        (tmp / STATE_FILE).write_text(json.dumps(doc, indent=1))
        sums = {name: _sha256(tmp / name) for name in CHECKPOINT_FILES}
        (tmp / CHECKSUM_FILE).write_text(json.dumps(sums, indent=1))

    return publish(folder, write, marker=True)


class NonFiniteWeights(SmoLoRAError):
    """The adapter holds NaN or inf: nothing worth checkpointing."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _state_problem(doc: dict) -> str | None:
    """What is wrong with a trainer_state.json's own fields, if anything."""
    missing = [k for k in ("step", "epoch", "cursor", "optimizer", "rng") if k not in doc]
    if missing:
        return f"lacks {', '.join(missing)}"
    if not all(
        isinstance(doc[k], int) and not isinstance(doc[k], bool) and doc[k] >= 0 for k in ("step", "epoch", "cursor")
    ):
        return "step, epoch and cursor must be whole numbers >= 0"
    optimizer, rng = doc["optimizer"], doc["rng"]
    if not (isinstance(optimizer, dict) and isinstance(optimizer.get("param_groups"), list)):
        return "optimizer lacks its param_groups"
    if not isinstance(optimizer.get("scalars"), dict):
        return "optimizer lacks its scalars"
    python, numpy = (rng.get("python"), rng.get("numpy")) if isinstance(rng, dict) else (None, None)
    if not (isinstance(python, list) and len(python) == 3 and isinstance(numpy, list) and len(numpy) == 5):
        return "rng does not hold Python's and NumPy's generator states"
    return None


def verify_checkpoint(folder: Path) -> str | None:
    """What is wrong with a complete checkpoint, in a few words naming the file; None when it can be
    resumed from. Files are checked against the checksums written with them (checkpoints written
    before there were checksums: each file is read as its format)."""
    folder = Path(folder)
    missing = next((name for name in CHECKPOINT_FILES if not (folder / name).is_file()), None)
    if missing is not None:
        return f"{folder / missing} is missing"
    sums_file = folder / CHECKSUM_FILE
    if sums_file.is_file():
        try:
            sums = json.loads(sums_file.read_text())
        except (ValueError, OSError):
            return f"{sums_file} is not readable JSON"
        if not isinstance(sums, dict):
            return f"{sums_file} is not a checksum list"
        for name in CHECKPOINT_FILES:
            if sums.get(name) != _sha256(folder / name):
                return f"{folder / name} does not match its checksum (changed or damaged since it was written)"
    try:
        doc = read_run_info(folder)
        config = json.loads((folder / "adapter_config.json").read_text())
    except (ValueError, OSError) as e:
        return f"{folder}: a JSON file is not readable ({type(e).__name__})"
    if not isinstance(config, dict) or not isinstance(doc, dict):
        return f"{folder}: adapter_config.json or {STATE_FILE} does not hold a JSON object"
    if (problem := _state_problem(doc)) is not None:
        return f"{folder / STATE_FILE}: {problem}"
    for name in ("adapter_model.safetensors", TENSOR_FILE):
        if (problem := unreadable_safetensors(folder / name)) is not None:
            return f"{folder / name} is not a readable safetensors file ({problem})"
    return None


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return safe_child(output_dir, "checkpoints", f"step-{step:06d}")


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and (p / MARKER).is_file()]
    return [p for _, p in sorted(found)]


def set_aside_newer(output_dir: str | Path, step: int) -> list[Path]:
    """Rename the complete checkpoints after ``step`` to ``abandoned-step-NNNNNN``: a run resumed
    from an earlier one replaces their future, and a later ``--resume`` must not pick them up."""
    moved = []
    for folder in list_checkpoints(output_dir):
        if int(STEP_DIR.match(folder.name).group(1)) > step:
            target = folder.with_name(f"abandoned-{folder.name}")
            n = 1
            while target.exists():
                n += 1
                target = folder.with_name(f"abandoned-{n}-{folder.name}")
            os.replace(folder, target)
            moved.append(target)
    return moved


def prune_checkpoints(output_dir: str | Path, keep: int) -> None:
    if keep <= 0:
        return
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def find_resume_checkpoint(output_dir: str | Path, resume: str | bool | None) -> Path | None:
    """``True``/"auto": the newest complete checkpoint in output_dir that verifies (None if there is
    none; a newer one that does not verify is passed over with a warning); a path: that checkpoint,
    which must verify."""
    if not resume:
        return None
    if resume is True or resume == "auto":
        found = list_checkpoints(output_dir)
        problems = []
        for folder in reversed(found):
            problem = verify_checkpoint(folder)
            if problem is None:
                for bad in problems:
                    warn(f"passing over a damaged checkpoint: {bad}; resuming from {folder.name}")
                return folder
            problems.append(problem)
        if problems:
            raise SmoLoRAError(f"no checkpoint in {output_dir} can be resumed from: {problems[0]}")
        return None
    path = Path(resume)
    if not (path / MARKER).is_file():
        raise SmoLoRAError(f"{path}: not a complete checkpoint (no {MARKER} marker)")
    if (problem := verify_checkpoint(path)) is not None:
        raise SmoLoRAError(f"cannot resume: {problem}")
    return path


def read_run_info(folder: Path) -> dict:
    return json.loads((folder / STATE_FILE).read_text())


def check_compatible(saved: dict, run_info: dict, allow_config_change: bool) -> None:
    """Refuse to resume into a different run: other data, another base model, other settings."""
    if saved.get("data_fingerprint") != run_info.get("data_fingerprint"):
        raise SmoLoRAError("cannot resume: the training data differs from the checkpoint's (fingerprint mismatch)")
    if (
        "model_fingerprint" in run_info and saved.get("model_fingerprint") != run_info["model_fingerprint"]
    ):  # once the model is loaded
        raise SmoLoRAError("cannot resume: the base model differs from the checkpoint's")
    if allow_config_change:
        return
    changed = []
    old_train, new_train = saved.get("train_config", {}), run_info.get("train_config", {})
    schedule = new_train.get("lr_scheduler_type", "constant")
    unsafe = {}  # resume-safe fields this run's settings make matter, and why
    # A run's length sets the learning rate of every step of a decaying schedule.
    if schedule != "constant" or old_train.get("lr_scheduler_type", "constant") != "constant":
        unsafe |= dict.fromkeys(LENGTH_FIELDS, f"sets the {schedule} schedule's learning rates")
    # Rank growth happens at shares of the run's length.
    if old_train.get("grow_rank") or new_train.get("grow_rank"):
        unsafe |= dict.fromkeys(LENGTH_FIELDS, "sets the steps where the rank grows")
    # Early stopping compares evaluations: when they happen, and on what, decides the adapter kept.
    if old_train.get("early_stopping_patience") or new_train.get("early_stopping_patience"):
        unsafe["eval_steps"] = "decides which adapter early stopping keeps"
        if saved.get("val_fingerprint") != run_info.get("val_fingerprint"):
            changed.append("validation data (decides which adapter early stopping keeps)")
    if saved.get("processes", 1) != run_info.get("processes", 1):  # torchrun's process count
        changed.append(
            f"processes: {saved.get('processes', 1)} -> {run_info.get('processes', 1)} (sets each step's examples)"
        )
    for section in ("train_config", "lora_config"):
        old, new = saved.get(section, {}), run_info.get(section, {})
        for k in sorted(set(old) | set(new)):
            if (k not in RESUME_SAFE_FIELDS or k in unsafe) and old.get(k) != new.get(k):
                changed.append(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" + (f" ({unsafe[k]})" if k in unsafe else ""))
    if changed:
        raise SmoLoRAError(
            "cannot resume: settings differ from the checkpoint's ("
            + "; ".join(changed)
            + "); pass --allow-config-change to resume anyway"
        )


def load_checkpoint(folder: Path, model, optimizer, rank: int = 0) -> TrainState:
    """Restore adapter weights, optimizer and RNG states (process ``rank``'s, in a data-parallel
    run) from ``folder``; return the train state."""
    from peft.utils import set_peft_model_state_dict

    doc = read_run_info(folder)
    adapter = load_file(str(folder / "adapter_model.safetensors"))
    try:
        result = set_peft_model_state_dict(model, adapter)
    except RuntimeError as e:  # another rank or other targets than this run's adapter
        raise SmoLoRAError(f"{folder}: the checkpoint's adapter does not fit this run's ({load_mismatch(e)})") from None
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise SmoLoRAError(f"{folder}: adapter has keys this model lacks ({unexpected[0]} ...)")
    tensors = load_file(str(folder / TENSOR_FILE))
    _optimizer_from_flat(optimizer, {k: v for k, v in tensors.items() if k.startswith("state.")}, doc["optimizer"])
    device = next(model.parameters()).device
    rng_restore(doc["rng"], {k: v for k, v in tensors.items() if k.startswith("rng.")}, rank, device)
    best = {k.removeprefix("best."): v for k, v in tensors.items() if k.startswith("best.")}
    return TrainState(
        step=doc["step"],
        epoch=doc["epoch"],
        cursor=doc["cursor"],
        losses=list(doc.get("losses", [])),
        loss_scale=doc.get("loss_scale"),
        best_eval=doc.get("best_eval"),
        best_step=doc.get("best_step", 0),
        best_weights={k: v.to(device) for k, v in best.items()} or None,
        evals_since_best=doc.get("evals_since_best", 0),
        stopped=doc.get("stopped", False),
    )
