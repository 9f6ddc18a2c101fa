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
