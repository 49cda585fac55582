"""The one exception family of d2moe.

Every message names the thing that is wrong (file, tensor, expert, option) and how to fix it.
The CLI prints it as one red line and exits with `exit_code`; usage errors from typer/click exit 2.
"""


class D2MoEError(Exception):
    """Base class: anything d2moe reports to a user."""

    exit_code = 1


class UsageError(D2MoEError):
    """An option value that cannot be used (bad size string, bad bit list, conflicting flags)."""


class InputError(D2MoEError):
    """A missing or unreadable input: path, prompts file, calibration data."""


class UnsupportedModelError(InputError):
    """A source checkpoint whose architecture has no adapter."""


class FormatError(D2MoEError):
    """A packed checkpoint (or gate file) that is foreign, truncated, corrupted or of another version."""


class GateMismatchError(InputError):
    """A bit-width gate trained for another model, other levels or other capacities."""


class BudgetError(D2MoEError):
    """A memory budget below the minimum the model needs to run at all."""


class DependencyError(D2MoEError):
    """An optional dependency (cupy, lm-eval, matplotlib) is missing."""
