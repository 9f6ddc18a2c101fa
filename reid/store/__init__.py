"""The gallery index: an SQLite catalogue (source of truth) plus a derived FAISS file.

Use ``GalleryStore`` (add, search, remove, count, verify); ``index_folder`` in
``reid.store.ingest`` walks a folder and keeps an index in step with it.
"""

from reid.store.catalogue import FileState, Record, Row, id_digest
from reid.store.gallery import CATALOGUE_NAME, VECTORS_NAME, GalleryStore, Hit, VectorState
from reid.store.lock import WriterLock
from reid.store.vectors import KINDS, VectorIndex, resolve_kind

DEFAULT_INDEX = "indexes/default"

__all__ = [
    "CATALOGUE_NAME", "DEFAULT_INDEX", "KINDS", "VECTORS_NAME", "FileState", "GalleryStore", "Hit", "Record",
    "Row", "VectorIndex", "VectorState", "WriterLock", "id_digest", "resolve_kind",
]
