"""The project's exceptions: one root so callers can catch ours apart from everything else.

Each stage records these per item (slide, shard, checkpoint) with their message as the reason, so the
message must say what failed and why in one line.
"""


class GpfmError(Exception):
    """Root of every error raised on purpose by gpfm-scale."""


class ConfigError(GpfmError, ValueError):
    """A config file, key or value is invalid; the message names the key."""


class SlideReadError(GpfmError):
    """A slide cannot be opened or read (corrupt, truncated, not an image, unsupported)."""


class MissingMppError(SlideReadError):
    """No microns-per-pixel for a slide: not in its metadata, the manifest or the config."""


class ShardError(GpfmError):
    """A WebDataset shard is unreadable, truncated, or inconsistent with the run manifest."""


class CheckpointMismatchError(GpfmError):
    """A checkpoint or weight file does not match the model it is loaded into."""


class UnsafeNameError(GpfmError):
    """A name taken from data (slide id, tar key, class folder, manifest column) would escape its directory."""


class OutputLockedError(GpfmError):
    """Another run holds the output directory; the message names the holder."""


class ResourcesUnavailableError(GpfmError):
    """The cluster did not offer what a stage needs (GPUs, CPU slots) within its `resources_timeout_s`."""


class MissingExtraError(GpfmError):
    """A feature needs an optional dependency that is not installed; the message names the extra to install."""
