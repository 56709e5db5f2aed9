"""Checking an output location up front, so a long run never dies at its first write."""
from __future__ import annotations

import os
import tempfile

from data_prep.errors import PrepError


def prepare_output_dir(prefix: str) -> None:
    """Create the output directory and prove it is writable, or fail naming it."""
    directory = os.path.dirname(os.path.abspath(prefix))
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".megalm-prep-write-test-"):
            pass
    except OSError as exc:
        raise PrepError(f"output directory {directory!r} is not writable: {exc.strerror or exc}") from None
    if os.path.isdir(prefix):
        raise PrepError(f"--output-prefix {prefix!r} is a directory; give a file name prefix such as {prefix}/corpus")
