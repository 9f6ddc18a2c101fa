"""The one exception family of the library. The CLI prints its message on one line and exits 1."""


class ReidError(Exception):
    """Base of every error the user can act on (bad input, missing files, mismatched index)."""


class InputError(ReidError):
    """Bad user input: a missing path, an unreadable file, an invalid option value."""


class ImageDecodeError(InputError):
    """An image file that cannot be decoded; the message says why."""


class DatasetError(ReidError):
    """A dataset root that does not hold the expected layout."""


class CheckpointError(ReidError):
    """A checkpoint that is missing, corrupt, untrusted or incompatible."""


class StoreError(ReidError):
    """An index that is missing, corrupt, locked by another writer or built by another model."""


class GalleryNotFoundError(StoreError):
    """No gallery at ``location``; front ends add how to build one."""

    def __init__(self, location: str, message: str | None = None) -> None:
        self.location = location
        super().__init__(message or f"no index at {location}")


class EmptyGalleryError(StoreError):
    """A gallery without rows (or without a model yet); front ends add how to fill it."""

    def __init__(self, location: str) -> None:
        self.location = location
        super().__init__(f"index {location} is empty")


class GalleryBusyError(StoreError):
    """Another process holds a gallery's writer lock (after ``waited`` seconds); front ends add how to wait."""

    def __init__(self, location: str, message: str, waited: float = 0.0) -> None:
        self.location, self.waited = location, waited
        super().__init__(message)


class ModelMismatchError(StoreError):
    """A gallery's vectors come from another model than the one given (fingerprints differ).

    ``built_with`` and ``given`` are ``reid.model.identity.ModelRef``s; front ends add their own advice
    (the CLI suggests ``--weights`` or ``--rebuild``).
    """

    def __init__(self, gallery: str, *, built_with, given) -> None:
        self.gallery, self.built_with, self.given = gallery, built_with, given
        super().__init__(f"gallery {gallery} was built with the model {built_with.source} (fingerprint "
                         f"{built_with.fingerprint}), not with {given.source} ({given.fingerprint})")


class DetectorError(ReidError):
    """A person detector that is not installed, or whose model file cannot be read."""
