"""The one exception type for mistakes a user can make in a config or on the command line."""


class ConfigError(ValueError):
    """Raised before any training or sampling; its message names the value and the fix."""
