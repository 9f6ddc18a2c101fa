"""Which model made a set of embeddings: a source (the packaged default or a checkpoint) and a fingerprint.

Every gallery records the ``ModelRef`` it was built with; index, query, evaluate and ``reid info``
all load, name and compare models through this one type, so "is this the same model?" has one
answer everywhere: the fingerprint (config + every weight) is equal.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from reid.errors import CheckpointError, ModelMismatchError

DEFAULT_SOURCE = "default"


def model_source(weights: str | os.PathLike | None) -> str:
    """``default`` for the packaged network, else the checkpoint's absolute, resolved path."""
    if weights is None or str(weights) == DEFAULT_SOURCE:
        return DEFAULT_SOURCE
    return str(Path(weights).expanduser().resolve())


@dataclass(frozen=True)
class ModelRef:
    """A model's identity: where it is loaded from, its fingerprint and its embedding dimension."""

    source: str
    fingerprint: str
    dim: int

    @property
    def is_default(self) -> bool:
        """True for the packaged default network."""
        return self.source == DEFAULT_SOURCE

    @classmethod
    def of(cls, model, source: str = "in-memory model") -> ModelRef:
        """The identity of a model in memory (its fingerprint is computed here)."""
        from reid.model.checkpoint import model_fingerprint

        return cls(source, model_fingerprint(model), int(model.embed_dim))

    @classmethod
    def load(cls, weights: str | os.PathLike | None = None, device=None):
        """Load the default network or a checkpoint, in eval mode on ``device`` -> (model, ModelRef).

        CheckpointError when the checkpoint is missing, corrupt or untrusted.
        """
        from reid.model.checkpoint import load_model

        source = model_source(weights)
        model = load_model(source)
        if device is not None:
            model = model.to(device)
        return model.eval(), cls.of(model, source)

    def require_same(self, built_with: ModelRef, gallery: str) -> None:
        """ModelMismatchError unless this is the model ``gallery``'s vectors were built with."""
        if self.fingerprint != built_with.fingerprint:
            raise ModelMismatchError(gallery, built_with=built_with, given=self)


def load_built_with(built_with: ModelRef, gallery: str, device=None):
    """Load the model a gallery was built with and check it is still that model -> (model, ModelRef).

    ModelMismatchError when its checkpoint now holds other weights; CheckpointError (naming the
    gallery) when it cannot be loaded any more.
    """
    try:
        model, ref = ModelRef.load(built_with.source, device)
    except CheckpointError as e:
        raise CheckpointError(f"gallery {gallery} was built with the model {built_with.source}, which cannot be "
                              f"loaded now: {e}") from None
    ref.require_same(built_with, gallery)
    return model, ref
