"""Read-only file descriptors that survive pickling and fork: the shard readers' (image shards,
conditioning cache) way of reading by byte offset from DataLoader workers and DALI's parallel
external source."""

from __future__ import annotations

import os


class DescriptorCache:
    """Files opened read-only on first use and kept open, per process. A pickled copy or a forked
    child starts with none (the parent owns, and may close, the inherited descriptors) and opens its
    own."""

    def __init__(self):
        self._fds: dict[str, int] = {}
        self._pid = os.getpid()

    def get(self, path: str | os.PathLike) -> int:
        """The descriptor of `path`; OSError when it cannot be opened."""
        if self._pid != os.getpid():  # forked
            self._fds, self._pid = {}, os.getpid()
        key = os.fspath(path)
        fd = self._fds.get(key)
        if fd is None:
            fd = self._fds[key] = os.open(key, os.O_RDONLY)
        return fd

    def close(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = {}

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()
