"""A memory cgroup for a child process: what a container's or systemd's memory limit is.

A cgroup charges page cache to the group, so it shows whether a run's footprint is
honest (buffered reads of a model bigger than the limit push the group into reclaim
and can get it killed). Used by the offload tests and benchmarks; needs root and a
cgroup v2 or v1 memory controller.

Example:
    >>> with MemoryCgroup.create(600 << 20) as cg:          # None where impossible
    ...     subprocess.run(cmd, preexec_fn=cg.join)
    ...     print(cg.peak(), cg.oom_kills())
"""
from __future__ import annotations

import os
import time
from pathlib import Path

ROOT_V2 = Path("/sys/fs/cgroup")
ROOT_V1 = Path("/sys/fs/cgroup/memory")


class MemoryCgroup:
    """A memory cgroup directory (v2 or v1) with a limit."""

    def __init__(self, path: Path, v2: bool) -> None:
        self.path, self.v2 = path, v2

    @classmethod
    def create(cls, limit: int, name: str | None = None) -> "MemoryCgroup | None":
        """A new cgroup limited to ``limit`` bytes (no swap on v2), or None where it cannot be made."""
        if not hasattr(os, "geteuid") or os.geteuid() != 0:
            return None
        name = name or f"flashlm_{os.getpid()}_{time.monotonic_ns()}"
        controllers = ROOT_V2 / "cgroup.controllers"
        try:
            if controllers.is_file() and "memory" in controllers.read_text().split():
                d = ROOT_V2 / name
                d.mkdir()
                (d / "memory.max").write_text(str(int(limit)))
                if (d / "memory.swap.max").exists():
                    (d / "memory.swap.max").write_text("0")
                return cls(d, True)
            if ROOT_V1.is_dir():
                d = ROOT_V1 / name
                d.mkdir()
                (d / "memory.limit_in_bytes").write_text(str(int(limit)))
                return cls(d, False)
        except OSError:
            return None
        return None

    def join(self) -> None:
        """Move the calling process into the cgroup (use as ``preexec_fn``: before exec, so the
        child's every byte is charged)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def peak(self) -> int:
        """The group's highest memory use (v2 memory.peak, v1 memory.max_usage_in_bytes)."""
        for f in ("memory.peak", "memory.max_usage_in_bytes"):
            if (self.path / f).exists():
                return int((self.path / f).read_text().split()[0])
        return 0

    def reset_peak(self) -> None:
        for f in ("memory.peak", "memory.max_usage_in_bytes"):
            try:
                (self.path / f).write_text("0")
            except OSError:
                pass

    def oom_kills(self) -> int:
        """Processes the kernel killed in this group for want of memory."""
        for f in ("memory.events", "memory.oom_control"):
            if (self.path / f).exists():
                for line in (self.path / f).read_text().splitlines():
                    k, _, v = line.partition(" ")
                    if k == "oom_kill":
                        return int(v)
        return 0

    def remove(self) -> None:
        for _ in range(50):  # the last process may take a moment to leave
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)

    def __enter__(self) -> "MemoryCgroup":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
