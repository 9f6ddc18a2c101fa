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
