"""Ceph's Python bindings of librados and librbd, as Debian packages them.

``python3-rados`` and ``python3-rbd`` install two extension modules into Debian's
``/usr/lib/python3/dist-packages``, built for CPython 3.11. A venv does not see that
directory, and putting all of it on ``sys.path`` (``--system-site-packages``, a ``.pth``
line) would let every Debian Python package shadow the venv's own. So only these two files
are loaded from there, by path, and registered under their own names (``rbd`` imports
``rados``). Where the modules are importable already (Debian's own python3, a
PYTHONPATH), those are used.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from qsd_py.errors import QMPError

DEBIAN_DIST = Path("/usr/lib/python3/dist-packages")


def _load(name: str) -> ModuleType:
    """Import ``name``, else load it from Debian's directory (only a file built for this
    interpreter's ABI: the suffixes are the interpreter's own)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        pass
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = DEBIAN_DIST / f"{name}{suffix}"
        if path.exists():
            spec = importlib.util.spec_from_file_location(name, path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[name]
                raise
            return module
    raise QMPError(
        f"The rbd driver needs Ceph's Python bindings ({name}): apt-get install python3-{name}"
    )


def load() -> tuple[ModuleType, ModuleType]:
    """The ``rados`` and ``rbd`` modules."""
    rados = _load("rados")
    return rados, _load("rbd")
