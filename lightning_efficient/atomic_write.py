"""One way to write a file so that a reader, or a run killed mid-write, never sees half of it.

The content goes into a temporary file in the target's own directory (so the final move never
crosses a filesystem), is flushed (and, with ``sync=True``, forced to disk), gets the file mode
``mode`` (``mkstemp`` creates 0600, which other users could not read), and is then moved over the
target with ``os.replace``. A failure at any point removes the temporary file and leaves the old
target as it was. Checkpoints, the tokenizer cache, the peak-FLOPs cache and ``efficiency.json``
are written through it.

Examples:
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "out" / "a.json"
    >>> write_atomically(path, '{"a": 1}')
    >>> path.read_text(), oct(path.stat().st_mode & 0o777), [p.name for p in path.parent.iterdir()]
    ('{"a": 1}', '0o644', ['a.json'])
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["FILE_MODE", "write_atomically"]

#: The mode of every file written: readable by everyone, writable by its owner.
FILE_MODE = 0o644


def write_atomically(
    path: str | Path, content: str | bytes | Callable[[BinaryIO], None], sync: bool = False, mode: int = FILE_MODE
) -> None:
    """Write ``content`` to ``path`` atomically (see the module docstring); missing directories are created.

    Args:
        path: The file to write.
        content: Text (UTF-8), bytes, or a function that writes into the binary file it is given
            (e.g. ``lambda file: torch.save(obj, file)``).
        sync: ``os.fsync`` before the move, so the new file survives a power cut, not just a kill.
        mode: The file mode of the result.

    Raises:
        OSError: The directory cannot be created or written, or the disk is full (nothing is left behind).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            if callable(content):
                content(file)
            else:
                file.write(content.encode("utf-8") if isinstance(content, str) else content)
            file.flush()
            if sync:
                os.fsync(file.fileno())
            os.fchmod(file.fileno(), mode)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise
