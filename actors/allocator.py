"""Which memory allocator the model-holding processes run with (`--allocator`).

glibc's malloc returns and re-requests the memory of the many short-lived tensors of each
model call; tcmalloc keeps it in per-thread caches, and vLLM's CPU docs advise preloading it.
On the 2-core development machine it made no measurable difference, to the model calls in
one process or to the batch job (bench/allocator.py, bench/pipeline.py --allocators;
bench/RESULTS.md "Allocator"), so the default stays glibc's. An allocator must be chosen when
a process starts (`LD_PRELOAD`), so Switchyard sets it in the runtime_env of the processes it
starts: the batch job's actors and Serve's model replicas.

    system    the system allocator (glibc malloc), the default
    auto      tcmalloc when its library is installed (Debian/Ubuntu: libtcmalloc-minimal4,
              or libgoogle-perftools4), else the system allocator
    tcmalloc  tcmalloc, or refuse to start when it is not installed
"""

from __future__ import annotations

import os
from pathlib import Path

ALLOCATORS = ("auto", "tcmalloc", "system")
LIBRARIES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")  # minimal: no heap profiler, same allocator
SEARCH_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib",
               "/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu")
NOT_INSTALLED = ("tcmalloc is not installed on this machine (looked for {names} in {dirs}); install it "
                 "(Debian/Ubuntu: apt-get install libtcmalloc-minimal4) or use --allocator auto or system")


def find_tcmalloc(dirs: tuple[str, ...] = SEARCH_DIRS) -> str | None:
    """The path of an installed tcmalloc library, or None."""
    for directory in dirs:
        for name in LIBRARIES:
            path = Path(directory) / name
            if path.is_file():
                return str(path)
    return None


def allocator_env(allocator: str, dirs: tuple[str, ...] = SEARCH_DIRS) -> dict[str, str]:
    """The environment variables that give a new process `allocator`.

    Args:
        allocator: one of ALLOCATORS.
        dirs: where to look for the library (the machine's standard library folders).

    Returns:
        {"LD_PRELOAD": ...} with tcmalloc put in front of what LD_PRELOAD already holds, or
        {} (the system allocator, or auto without tcmalloc installed).

    Raises:
        ValueError: an unknown allocator, or tcmalloc asked for and not installed.
    """
    if allocator not in ALLOCATORS:
        raise ValueError(f"allocator {allocator!r} is not one of {', '.join(ALLOCATORS)}")
    if allocator == "system":
        return {}
    path = find_tcmalloc(dirs)
    if path is None:
        if allocator == "tcmalloc":
            raise ValueError(NOT_INSTALLED.format(names=" or ".join(LIBRARIES), dirs=", ".join(dirs)))
        return {}
    already = [p for p in os.environ.get("LD_PRELOAD", "").split(":") if p]
    if any("tcmalloc" in Path(p).name for p in already):
        return {"LD_PRELOAD": ":".join(already)}
    return {"LD_PRELOAD": ":".join([path, *already])}


def runtime_env(allocator: str) -> dict:
    """A Ray `runtime_env` giving the actors it starts `allocator` ({} when nothing to set)."""
    env = allocator_env(allocator)
    return {"env_vars": env} if env else {}


def running_allocator() -> str:
    """What this process runs with: "tcmalloc" when it is loaded, else "system"."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    return "tcmalloc" if "libtcmalloc" in maps else "system"
