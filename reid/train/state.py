"""Run folder of a training run: atomic checkpoints, resumable state, metrics log, ``RunFolder``. No pickle.

``runs/NAME/``
  ``train.json``      the training config and the identity of the training set (checked on resume)
  ``last/``           model checkpoint (``reid.model.save_checkpoint``) + ``train_state.pt``
  ``best/``           model checkpoint with the best mAP so far (+ ``metrics.json``)
  ``metrics.jsonl``   one JSON line per epoch

``train_state.pt`` holds only tensors, numbers, strings, lists and dicts (optimizer and scaler
state, sampler epoch, RNG states) and is read back with ``torch.load(weights_only=True)``. It
lives inside ``last/`` so the weights and the state it belongs to are swapped in together.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

import reid.atomic
from reid.atomic import atomic_path
from reid.errors import CheckpointError, InputError
from reid.train.config import TrainConfig

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"
STATE_VERSION = 1


def recover_dir(final: Path) -> None:
    """Undo a checkpoint swap interrupted between its two renames, and drop half-written temp folders."""
    if reid.atomic.recover_dir(final):
        log.warning("restored %s from an interrupted checkpoint swap", final)


def save_model_dir(model: torch.nn.Module, final: Path, extra: dict[str, Any] | None = None) -> None:
    """Write a model checkpoint folder (plus ``extra`` files: name -> JSON data or state dict) atomically."""
    from reid.model.checkpoint import write_checkpoint_folder

    with reid.atomic.atomic_dir(final) as tmp:
        write_checkpoint_folder(model, tmp)
        for name, data in (extra or {}).items():
            if name.endswith(".json"):
                (tmp / name).write_text(json.dumps(data, indent=2, sort_keys=True))
            else:
                torch.save(data, tmp / name)


def rng_state() -> dict[str, Any]:
    """torch (CPU + CUDA), numpy global and Python ``random`` states as plain tensors and numbers."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": int(py_version), "internal": torch.tensor(py_internal, dtype=torch.int64),
                   "gauss_next": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` captured."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            log.warning("CUDA RNG state saved for %d devices, %d present: not restored",
                        len(cuda_states), torch.cuda.device_count())


def load_state(folder: Path) -> dict[str, Any]:
    """Read ``train_state.pt`` from a ``last/`` folder; CheckpointError when missing or unreadable."""
    path = folder / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder} holds no {STATE_FILE}; it cannot be resumed "
                              "(choose another `out` folder to start a new run)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read is a bad checkpoint for the user
        raise CheckpointError(f"cannot read training state {path}: {type(e).__name__}: {e}") from e
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise CheckpointError(f"{path} is not a training state this version of reid can resume")
    return state


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object, turning damage into CheckpointError."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return data


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON to a temp file, fsync, then ``os.replace`` it into place."""
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)


class MetricsLog:
    """Append-only JSON Lines log of per-epoch records."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def records(self) -> list[dict[str, Any]]:
        """All records written so far (a torn last line from a crash is ignored)."""
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                log.warning("ignoring a damaged line in %s", self.path)
        return out

    def truncate_after(self, epoch: int) -> None:
        """Drop records of epochs after ``epoch`` (written before a crash, then redone on resume)."""
        keep = [r for r in self.records() if int(r.get("epoch", 0)) <= epoch]
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in keep)
        with atomic_path(self.path) as tmp:
            tmp.write_text(text)

    def append(self, record: dict[str, Any]) -> None:
        """Append one record and flush it to disk."""
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


RUN_FILE = "train.json"
# Changing these on resume changes what is being trained: refused rather than silently mixed.
_FIXED_ON_RESUME = ("batch_p", "batch_k", "seed")


def dataset_identity(dataset: Any) -> dict[str, Any]:
    """Name, size and a digest of the training list (file names + ids), to refuse resuming on other data."""
    h = hashlib.sha256()
    for s in dataset.train:
        h.update(f"{Path(s.path).name}\t{s.pid}\t{s.camid}\n".encode())
    return {
        "name": dataset.name,
        "train_images": len(dataset.train),
        "train_ids": len({s.pid for s in dataset.train}),
        "train_digest": h.hexdigest()[:16],
    }


def _describe(ident: Any) -> str:
    if not isinstance(ident, dict):
        return "an unknown dataset"
    return (f"{ident.get('name')}: {ident.get('train_images')} images of {ident.get('train_ids')} identities, "
            f"digest {ident.get('train_digest')}")


class RunFolder:
    """The folder of one training run: refuses to mix runs, records the settings, saves checkpoints."""

    def __init__(self, out: Path, config: TrainConfig, dataset: Any, *, resume: bool) -> None:
        self.out, self.config, self.dataset = out, config, dataset
        self.last_dir, self.best_dir = out / "last", out / "best"
        self.metrics = MetricsLog(out / "metrics.jsonl")
        recover_dir(self.last_dir)
        recover_dir(self.best_dir)
        if resume:
            self._check_resumable()
        elif self.last_dir.exists():
            raise InputError(
                f"{out} already holds a training run; continue it with `resume=True` or choose another `out` folder"
            )

    def _check_resumable(self) -> None:
        if not self.last_dir.exists():
            raise CheckpointError(f"nothing to resume in {self.out}: no last/ checkpoint "
                                  "(start a new run without `resume=True`)")
        saved = read_json(self.out / RUN_FILE) if (self.out / RUN_FILE).exists() else None
        if saved is None:
            raise CheckpointError(f"{self.out} has no {RUN_FILE}; it was not written by reid train")
        ident = dataset_identity(self.dataset)
        if saved.get("dataset") != ident:
            raise CheckpointError(
                f"the checkpoint in {self.out} was trained on {_describe(saved.get('dataset'))}, not on this "
                f"dataset ({_describe(ident)}); resume with the same dataset or choose another `out` folder"
            )
        old = TrainConfig.from_dict(saved.get("config", {}))
        for key in _FIXED_ON_RESUME:
            if getattr(old, key) != getattr(self.config, key):
                raise CheckpointError(
                    f"the run in {self.out} used {key}={getattr(old, key)}, not {getattr(self.config, key)}; "
                    f"resume with the same value or choose another `out` folder"
                )
        changed = {k: (v, getattr(self.config, k)) for k, v in old.to_dict().items()
                   if v != self.config.to_dict()[k] and k not in ("epochs", "eval_every")}
        if changed:
            log.warning("resuming with changed settings (old -> new): %s", changed)

    def write_run_file(self, model_config: dict[str, Any]) -> None:
        """Record config and data identity (before the first checkpoint, so resume can check them)."""
        self.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.out / RUN_FILE, {
            "config": self.config.to_dict(), "dataset": dataset_identity(self.dataset),
            "dataset_info": {k: str(v) for k, v in getattr(self.dataset, "info", {}).items()},
            "model_config": model_config,
        })

    def save(self, model: torch.nn.Module, state: dict[str, Any], record: dict[str, Any], *, best: bool) -> None:
        """Metrics line first, then the checkpoint: a crash between them is undone by truncate_after on resume."""
        self.metrics.append(record)
        save_model_dir(model, self.last_dir, {STATE_FILE: state, "metrics.json": record})
        if best:
            save_model_dir(model, self.best_dir, {"metrics.json": record})


def load_run_config(out: str | Path) -> TrainConfig | None:
    """The TrainConfig recorded in ``out/train.json`` (None when there is no run there)."""
    path = Path(out) / RUN_FILE
    return TrainConfig.from_dict(read_json(path).get("config", {})) if path.exists() else None
