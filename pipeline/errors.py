"""Exception types for errors a user can fix.

The CLI prints a `PipelineError` as one line and exits with status 2; anything else
is a bug and keeps its traceback. Messages follow one shape: what was expected, what
was received, how to fix it.
"""


class PipelineError(Exception):
    """Base class of the errors caused by input or configuration, not by a bug."""


class ConfigError(PipelineError, ValueError):
    """An invalid option or combination of options."""


class DataError(PipelineError):
    """A dataset that cannot be read, or that reads as something unusable."""


class WeightsUnavailableError(PipelineError):
    """Pretrained weights that are neither cached nor downloadable."""


class CacheError(PipelineError):
    """A feature file that is missing, incomplete, or built with other settings."""


class LockError(PipelineError):
    """An output whose lock file cannot be taken (a filesystem without locks, permissions)."""


class NotFittedError(PipelineError, ValueError, AttributeError):
    """A head used before `fit` (the bases of scikit-learn's exception of that name)."""


class RuntimeFailure(PipelineError):
    """An inference runtime that could not convert or verify a backbone (RUNTIME named explicitly)."""


class WorkerError(PipelineError):
    """Work that failed on every try on a cluster's workers (ENGINE=ray)."""
