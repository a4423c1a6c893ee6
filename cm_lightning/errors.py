"""The exceptions the entry points print as one line: a user's mistake in a config or on the command line,
and a fault that stops training."""


class ConfigError(ValueError):
    """Raised before any training or sampling; its message names the value and the fix."""


class TrainingError(RuntimeError):
    """Training stopped on a fault it must not continue past (a NaN loss); the message names the step and
    what was kept. Printed as one line, exit code 1."""
