"""detkit's exception hierarchy.

Library code raises these with a sentence a user can act on; only the CLI turns them
into exit codes and coloured text.
"""

from __future__ import annotations


class DetkitError(Exception):
    """Base class of every error detkit raises on purpose."""


class InputError(DetkitError, ValueError):
    """An argument is wrong: dtype, shape, NaN where not allowed, empty, unknown name."""


class ContextTooLong(InputError):
    """A prompt and the tokens asked for do not fit the model's context."""


class BackendUnavailable(DetkitError, RuntimeError):
    """A requested backend (CUDA, CuPy, NVRTC, a compiler) is missing on this machine."""


class InvarianceViolation(DetkitError, AssertionError):
    """A computation that must be batch invariant or deterministic was not."""


class CompileError(DetkitError, RuntimeError):
    """A CUDA kernel failed to compile; the message carries the compiler log."""


class KernelLaunchError(DetkitError, RuntimeError):
    """A CUDA kernel could not be launched; the message names it and its configuration."""


class ModelLoadError(DetkitError):
    """A model or tokenizer could not be found or loaded."""


class EndpointError(DetkitError):
    """An inference server could not be reached or answered with an error."""


class ReportError(DetkitError):
    """A saved report is missing, unreadable or of an unknown schema version."""
