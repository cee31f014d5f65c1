"""Finishing an atomically written file: a temporary file in the target's
folder is renamed over the target, so a killed process leaves the old file
or the new one, never half of one.

``tempfile.mkstemp`` creates the temporary file readable by its owner alone
(mode 0600), and a rename keeps that mode: without :func:`publish` every
checkpoint, graph cache and written database would be unreadable by the
rest of a group on a shared cluster (a colleague's LAMMPS run, a job under
a service account), unlike any other file the user writes.
"""

from __future__ import annotations

import os


def new_file_mode() -> int:
    """The mode ``open()`` would give a new file now (0666 less the umask)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def publish(tmp: str, path: str) -> None:
    """Rename ``tmp`` over ``path`` with the mode of a newly created file."""
    os.chmod(tmp, new_file_mode())
    os.replace(tmp, path)
