"""User-facing errors: each message names the problem and the fix."""


class MeshlmError(Exception):
    """Base class for errors meshlm reports to the user without a traceback."""


class ConfigError(MeshlmError, ValueError):
    """A configuration that cannot work, caught before any process starts."""


class CheckpointError(MeshlmError):
    """A model path or file that cannot be loaded."""


class RequestError(MeshlmError, ValueError):
    """A request that cannot be served (too long, bad parameters)."""
