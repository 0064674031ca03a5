"""One way to write a file so that a reader (or a killed job) never sees it half-written.

The content goes to a temporary file in the target's own folder (same file system), which is then renamed over
the target (``os.replace``, atomic on POSIX). A failure removes the temporary file and leaves any earlier target
as it was. Every result file of the suite (records, tables, figures, adapters, generated data) is written here;
whole folders (a converted model, a quantized base, a checkpoint) are built in a temporary folder and renamed in
the same way by their own code (``qftbench.models``, ``methods.base_io``, ``qftbench.train``).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, data: str | bytes | Callable[[str], Any]) -> Path:
    """Write ``data`` to ``path`` atomically and return the path.

    ``data`` is text (written as UTF-8 with ``\\n`` line ends), bytes, or a function that writes the file whose
    path it is given (``lambda tmp: fig.savefig(tmp, format="png")``, ``lambda tmp: save_file(tensors, tmp)``).
    Parent folders are created. The file gets the permissions of a plain ``open`` (0666 less the umask), not
    ``mkstemp``'s 0600, so that results in a shared folder stay readable."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if callable(data):
            os.close(fd)
            data(tmp)
        else:
            mode, kw = ("wb", {}) if isinstance(data, bytes) else ("w", {"encoding": "utf-8", "newline": "\n"})
            with os.fdopen(fd, mode, **kw) as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """``obj`` as indented JSON with sorted keys (values JSON does not know written with ``str``), atomically."""
    return atomic_write(path, json.dumps(obj, indent=2, sort_keys=True, default=str))
