"""lamina's C++ kernels (lamina/csrc), compiled on first use and cached.

`torch.utils.cpp_extension.load` builds a source file with the compiler that built nothing else
here (g++ and ninja from the set-up); the result is cached under `$LAMINA_CACHE` (default
`~/.cache/lamina`) in a folder named by the torch version and the CPU, because the build targets
this CPU's instruction set. A machine without a compiler gets `None` and the reason, and the
callers fall back or refuse with that reason: a missing kernel never breaks an import.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
from functools import cache
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger("lamina.kernels")

SOURCES = Path(__file__).resolve().parent.parent / "csrc"
_FAILURES: dict[str, str] = {}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_folder(name: str) -> Path:
    """Where `name` is built: one folder per torch version and CPU (builds use -march=native)."""
    root = Path(os.environ.get("LAMINA_CACHE", Path.home() / ".cache" / "lamina"))
    tag = hashlib.sha1(f"{torch.__version__}|{_cpu_name()}".encode()).hexdigest()[:12]
    return root / "kernels" / f"{name}-{tag}"


@cache
def load_kernel(name: str) -> ModuleType | None:
    """The compiled module for lamina/csrc/`name`.cpp, or None (see `kernel_failure`)."""
    if os.environ.get("LAMINA_DISABLE_KERNELS"):
        _FAILURES[name] = "C++ kernels are disabled by LAMINA_DISABLE_KERNELS"
        return None
    try:
        from torch.utils import cpp_extension

        folder = build_folder(name)
        folder.mkdir(parents=True, exist_ok=True)
        module: ModuleType = cpp_extension.load(
            name=f"lamina_{name}",
            sources=[str(SOURCES / f"{name}.cpp")],
            extra_cflags=["-O3", "-march=native"],
            build_directory=str(folder),
            verbose=False,
        )
        return module
    except Exception as e:  # no compiler, no ninja, a failed build: fall back with the reason
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        _FAILURES[name] = f"building the C++ kernel {name!r} failed ({reason})"
        logger.warning(_FAILURES[name])
        return None


def kernel_failure(name: str) -> str | None:
    """Why `load_kernel(name)` returned None (after it did)."""
    return _FAILURES.get(name)


KERNELS = ("exact_attention", "paged_attention")


def build_all() -> None:
    """Build (or find cached) every kernel and say what happened (scripts/setup.sh)."""
    for name in KERNELS:
        ok = load_kernel(name) is not None
        print(f"C++ kernel {name}: {'ready' if ok else kernel_failure(name)}")
