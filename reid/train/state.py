"""Run folder of a training run: atomic checkpoints, resumable state, metrics log. No pickle.

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
from reid.errors import CheckpointError

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
        raise CheckpointError(f"{folder} holds no {STATE_FILE}; it cannot be resumed (start a new run with another --out)")
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
