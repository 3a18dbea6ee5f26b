"""The parent's side of a run: fill shards in the plan's order, each tar and its index written
atomically, the journal saved before each tar is renamed."""

from __future__ import annotations

import collections
import os
import signal
import sys
import time
from pathlib import Path
from typing import Iterable

from tqdm import tqdm

from fff_vdi.data.shards import FORMAT_VERSION, INDEX_FORMAT, frame_member_name, index_name, mask_member_name, \
    meta_member_name, shard_name
from fff_vdi.sharder.records import Journal
from fff_vdi.sharder.tarpack import TarShardWriter
from fff_vdi.sharder.videos import PackedSample, VideoResult
from fff_vdi.utils.atomic import atomic_open, atomic_write_json

CRASH_ENV = "FFF_VDI_SHARD_CRASH_AT"  # test hook, see crash_point()


def write_sample(tar: TarShardWriter, sample: PackedSample) -> dict:
    """Append one video's members; returns its index entry."""
    start = tar.append(sample.members)
    where = {name: [start + offset, size, crc] for name, (offset, size, crc) in sample.members.where.items()}
    key, n = sample.key, sample.num_frames
    return {
        "key": key,
        "video_id": sample.video_id,
        "num_frames": n,
        "width": sample.width,
        "height": sample.height,
        "json": where[meta_member_name(key)],
        "frames": [where[frame_member_name(key, i)] for i in range(n)],
        "masks": [where.get(mask_member_name(key, i)) for i in range(n)] if sample.has_masks else None,
    }


def crash_point(name: str, _arrivals: collections.Counter = collections.Counter()) -> None:
    """Test hook: with FFF_VDI_SHARD_CRASH_AT=<name>[:<n>] in the environment, the n-th arrival at
    `name` kills this process with SIGKILL, exactly like `kill -9` (used by the --resume tests)."""
    spec = os.environ.get(CRASH_ENV)
    if spec:
        point, _, count = spec.partition(":")
        if point == name:
            _arrivals[name] += 1
            if _arrivals[name] == int(count or 1):
                os.kill(os.getpid(), signal.SIGKILL)


class _Lookahead:
    """An iterator whose next item can be looked at without taking it."""

    _NOTHING = object()

    def __init__(self, items: Iterable):
        self._items = iter(items)
        self._next = self._NOTHING

    def peek(self):
        if self._next is self._NOTHING:
            self._next = next(self._items, None)
        return self._next

    def take(self):
        item, self._next = self.peek(), self._NOTHING
        return item


class ShardWriter:
    """Writes the videos of a run into shards, in the order given, filling each to `shard_size`."""

    def __init__(self, out: Path, shard_size: int, journal: Journal, progress: "Progress"):
        self.out, self.shard_size, self.journal, self.progress = out, shard_size, journal, progress

    def write_split(self, split: str, results: Iterable[VideoResult], first_number: int) -> list[dict]:
        """Consume one split's results; returns the indexes of the shards written."""
        results = _Lookahead(results)
        indexes = []
        while self._skip_to_next_sample(results):
            indexes.append(self._write_shard(shard_name(split, first_number + len(indexes)), results))
        return indexes

    def _skip_to_next_sample(self, results: _Lookahead) -> bool:
        while results.peek() is not None and results.peek().sample is None:
            self._consume(results.take())
        return results.peek() is not None

    def _write_shard(self, name: str, results: _Lookahead) -> dict:
        samples = []
        with atomic_open(self.out / name) as file:
            tar = TarShardWriter(file)
            try:
                while (result := results.peek()) is not None:
                    if result.sample is not None:
                        if samples and tar.size_with(result.sample.members.size) > self.shard_size:
                            break  # the shard is full; this video starts the next one
                        samples.append(write_sample(tar, result.sample))
                        crash_point("sample-written")
                    self._consume(results.take())
                size = tar.close()
            finally:
                tar.stop()
            self.journal.save()
            crash_point("tar-written")
        crash_point("tar-renamed")
        index = {"format": INDEX_FORMAT, "version": FORMAT_VERSION, "shard": name, "bytes": size,
                 "sha256": tar.sha256.hexdigest(), "samples": samples}
        atomic_write_json(self.out / index_name(name), index, indent=None)
        crash_point("index-written")
        return index

    def _consume(self, result: VideoResult) -> None:
        self.journal.records.extend(result.records)
        self.progress.update(result)


class Progress:
    """tqdm bar over videos with frames/s and MB/s read from the source."""

    def __init__(self, total: int):
        self.bar = tqdm(total=total, unit="video", dynamic_ncols=True, smoothing=0.05,
                        mininterval=0.5 if sys.stderr.isatty() else 30)
        self.start, self.frames, self.bytes = time.perf_counter(), 0, 0

    def update(self, result: VideoResult) -> None:
        self.frames += result.frames_read
        self.bytes += result.bytes_read
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{self.frames / elapsed:.0f} frames/s, {self.bytes / elapsed / 1e6:.1f} MB/s",
                                 refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
