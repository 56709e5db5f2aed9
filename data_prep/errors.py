"""The one exception type the CLI turns into a clean message and exit status 2 (usage / input error)."""
from __future__ import annotations


class PrepError(Exception):
    """A problem the user can fix (missing input, bad tokenizer, unwritable output, bad record under
    --strict). The message names the file (and line) and is printed as is, without a traceback."""

    exit_code = 2


class Interrupted(KeyboardInterrupt):
    """SIGTERM (scancel, kill, a supervisor), raised in the main process so that it stops exactly like
    Ctrl-C does: workers ended, temporary files removed, a resumable output left behind."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
