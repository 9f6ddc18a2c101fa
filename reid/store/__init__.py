"""Gallery persistence: the ``Gallery`` protocol and its backends, opened from a location string.

``open_gallery("indexes/default")`` opens the embedded SQLite + FAISS store in that folder
(``reid.store.local``); ``milvus://HOST:PORT/COLLECTION`` opens a Milvus collection (``reid.store.milvus``).
Callers use only the protocol's methods (``reid.store.base.Gallery``): add, remove, search with filters, get, count,
file states, the model it was built with, sync / verify, info.
"""

from __future__ import annotations

import os

from reid.errors import StoreError
from reid.store.base import FileState, Filter, Gallery, Hit, MediaState, Record, SyncState, Tracklet
from reid.store.catalogue import id_digest
from reid.store.local import CATALOGUE_NAME, VECTORS_NAME, GalleryStore
from reid.store.lock import WriterLock
from reid.store.vectors import KINDS, VectorIndex, resolve_kind

DEFAULT_INDEX = "indexes/default"


def open_gallery(location: str | os.PathLike, *, write: bool = False, wait: float = 0.0,
                 prefetch: bool = False) -> Gallery:
    """Open the gallery at ``location``: a folder (or ``file://`` + folder) is the embedded store,
    ``milvus://HOST:PORT/COLLECTION`` a Milvus collection (``reid.store.milvus``; pymilvus is imported only then).

    ``write`` creates it if needed and takes its writer lock, waiting up to ``wait`` seconds for
    another writer; ``prefetch`` (read-only) starts loading its vectors in the background, to overlap
    with loading a model. GalleryNotFoundError when a read-only location holds no gallery.
    """
    text = os.fspath(location)
    scheme, sep, rest = text.partition("://")
    if sep and scheme == "file":
        text = rest
    elif sep and scheme == "milvus":
        from reid.store.milvus import MilvusGallery

        return MilvusGallery.open(text, write=write, wait=wait, prefetch=prefetch)
    elif sep and scheme.isidentifier():
        raise StoreError(f"no gallery backend for {scheme}:// locations here; a folder is the embedded store")
    return GalleryStore.open(text, write=write, wait=wait, prefetch=prefetch)


__all__ = [
    "CATALOGUE_NAME", "DEFAULT_INDEX", "KINDS", "VECTORS_NAME", "FileState", "Filter", "Gallery", "GalleryStore",
    "Hit", "MediaState", "Record", "SyncState", "Tracklet", "VectorIndex", "WriterLock", "id_digest", "open_gallery",
    "resolve_kind",
]
