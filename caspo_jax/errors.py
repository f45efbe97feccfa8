"""The errors the CLI turns into one line on stderr and an exit code, never a traceback.

Library code raises a subclass (or an error class that inherits from one) when the cause
is something the user can act on; the message names the file, the line or field, and the
fix. `caspo_jax.launch` catches `CaspoError` at the edge and exits with `exit_code`.

    UserError  -> exit 2: bad input (config, data file, image, checkpoint directory).
    RunHalted  -> exit 3: a run stopped itself for a reason it names (e.g. every reward
                  failing for several steps) after saving a checkpoint it can resume from.
"""

from __future__ import annotations

__all__ = ["CaspoError", "RunHalted", "UserError"]


class CaspoError(Exception):
    """Base of the errors the CLI reports as one line (`caspo: <message>`)."""

    exit_code = 1


class UserError(CaspoError):
    """Input the user must fix; the message names the source, the field and the fix."""

    exit_code = 2


class RunHalted(CaspoError):
    """A run that stopped itself (after saving) because continuing would waste compute."""

    exit_code = 3
