"""Checkpoints without pickle: a folder (config.json + model.safetensors) or a tensors-only ``.pt`` file.

``.pt`` files are read only with ``torch.load(weights_only=True)``, which refuses any pickled object
that is not a tensor or a plain container, so a checkpoint cannot run code when it is opened.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle  # only for its exception type: nothing here unpickles
from pathlib import Path
from collections.abc import Mapping

import torch

from reid.atomic import atomic_dir, atomic_path, recover_dir
from reid.errors import CheckpointError, InputError
from reid.model.net import AttentionBilinearNet, ModelConfig, build_model

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "reid-attention-bilinear"
FORMAT_VERSION = 1


def _state_dict(model: AttentionBilinearNet) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies of every tensor (safetensors wants contiguous, unshared storage)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def save_checkpoint(model: AttentionBilinearNet, path: str | os.PathLike) -> Path:
    """Save to a folder (config.json + model.safetensors) or, for a path ending in .pt, one tensors-only file.

    Either is replaced atomically. A folder is written beside its final name and swapped in whole
    (``reid.atomic.atomic_dir``), so its weights and config always come from the same save; a folder
    that holds other files is refused rather than replaced.
    """
    path = Path(path)
    if path.suffix == ".pt":
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save({"format": FORMAT, "version": FORMAT_VERSION, "config": model.config.to_dict(),
                        "state_dict": _state_dict(model)}, tmp)
    else:
        recover_dir(path)
        if path.exists():
            if not path.is_dir():
                raise CheckpointError(f"cannot save a checkpoint folder at {path}: it is a file (use a .pt name "
                                      f"for a one-file checkpoint)")
            other = sorted(p.name for p in path.iterdir() if p.name not in (CONFIG_NAME, WEIGHTS_NAME))
            if other:
                raise CheckpointError(f"not replacing {path}: it holds other files ({', '.join(other[:3])}"
                                      f"{', ...' if len(other) > 3 else ''}); "
                                      "save the checkpoint to a folder of its own")
        with atomic_dir(path) as tmp:
            write_checkpoint_folder(model, tmp)
    log.info("saved checkpoint %s", path)
    return path


def write_checkpoint_folder(model: AttentionBilinearNet, folder: Path) -> None:
    """Write config.json + model.safetensors into an existing folder (callers swap the folder in whole)."""
    from safetensors.torch import save_file

    save_file(_state_dict(model), str(folder / WEIGHTS_NAME),
              metadata={"format": FORMAT, "version": str(FORMAT_VERSION)})
    (folder / CONFIG_NAME).write_text(
        json.dumps({"format": FORMAT, "version": FORMAT_VERSION, "config": model.config.to_dict()}, indent=2) + "\n")


def _read_pt(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refused to load {path}: it holds pickled objects other than tensors and plain containers "
            f"(an untrusted or foreign checkpoint); only reid checkpoints can be loaded"
        ) from e
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path} (corrupt or not a torch file): {e}") from e
    if not isinstance(payload, dict) or "config" not in payload or "state_dict" not in payload:
        raise CheckpointError(f"{path} is not a reid checkpoint: expected a dict with 'config' and 'state_dict'")
    if not isinstance(payload["config"], dict) or not isinstance(payload["state_dict"], dict):
        raise CheckpointError(f"{path} is not a reid checkpoint: 'config' and 'state_dict' must be dicts")
    return payload["config"], payload["state_dict"]


def _read_folder(folder: Path, weights: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointError(f"checkpoint {folder} has no {CONFIG_NAME}; expected {CONFIG_NAME} + {WEIGHTS_NAME}")
    if not weights.is_file():
        raise CheckpointError(f"checkpoint {folder} has no {weights.name}; expected {CONFIG_NAME} + {WEIGHTS_NAME}")
    try:
        doc = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {config_path}: {e}") from e
    config = doc.get("config") if isinstance(doc, dict) and "config" in doc else doc
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path} does not hold a model config object")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {weights} (corrupt or truncated safetensors file): {e}") from e
    return config, state


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> AttentionBilinearNet:
    """Load a checkpoint saved by save_checkpoint (folder, its model.safetensors, or .pt) in eval mode."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; "
                              f"pass a folder with {CONFIG_NAME} + {WEIGHTS_NAME} or a .pt file")
    if path.is_dir():
        raw_config, state = _read_folder(path, path / WEIGHTS_NAME)
    elif path.suffix == ".safetensors":
        raw_config, state = _read_folder(path.parent, path)
    else:
        raw_config, state = _read_pt(path)
    try:
        config = ModelConfig.from_dict(raw_config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} has an incompatible model config: {e}") from e
    model = build_model(config, pretrained=False)
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"checkpoint {path} holds non-tensor entries in its weights: {bad[:3]}")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not match its config: {len(missing)} missing weights {missing[:3]}, "
            f"{len(unexpected)} unexpected {unexpected[:3]}"
        )
    shapes = [k for k in expected if tuple(expected[k].shape) != tuple(state[k].shape)]
    if shapes:
        k = shapes[0]
        raise CheckpointError(
            f"checkpoint {path} does not match its config: {k} has shape {tuple(state[k].shape)}, "
            f"the config builds {tuple(expected[k].shape)} ({len(shapes)} mismatched tensors)"
        )
    model.load_state_dict(state, strict=True)
    return model.to(map_location).eval()


def model_fingerprint(model: AttentionBilinearNet) -> str:
    """'abn-' + 16 hex of sha256 over the config JSON and every tensor in key order; changes with either."""
    h = hashlib.sha256()
    h.update(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for key, value in sorted(model.state_dict().items()):
        t = value.detach().to("cpu").contiguous()
        h.update(f"\n{key}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, not a copy
    return "abn-" + h.hexdigest()[:16]


def load_model(weights: str | os.PathLike | None = None, *, config: ModelConfig | None = None, pretrained: bool = True,
               stream_weights: Mapping[str, str | os.PathLike | None] | None = None) -> AttentionBilinearNet:
    """A checkpoint when ``weights`` is given (``"default"`` counts as none), else a new network built by
    ``build_model(config, pretrained, stream_weights)`` (the default network when those are left alone)."""
    if weights is None or str(weights) == "default":
        return build_model(config, pretrained=pretrained, stream_weights=stream_weights)
    if config is not None or not pretrained or any(v is not None for v in (stream_weights or {}).values()):
        raise InputError("a checkpoint (`weights`) carries its own model config and weights; give either a "
                         "checkpoint or a description of a new model (config, streams, `pretrained=False`), not both")
    return load_checkpoint(weights)
