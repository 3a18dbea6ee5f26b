"""The sharder's worker-to-parent handoff through shared memory (fff_vdi/sharder/spool.py)."""

import os
import subprocess
import sys

from fff_vdi.sharder.spool import PREFIX, Payload, Spool
from fff_vdi.sharder.tarpack import Member, TarShardWriter, pack_members


def read(payload: Payload) -> bytes:
    with payload.buffers() as buffers:
        return b"".join(bytes(b) for b in buffers)


def test_a_payload_goes_through_a_spool_file_and_is_deleted_once_written(tmp_path):
    spool = Spool(str(tmp_path), os.getpid())
    payload = spool.put([b"abc", b"", b"defg"])
    assert payload.size == 7 and payload.parts is None
    assert os.path.basename(payload.path).startswith(f"{PREFIX}{os.getpid()}-")
    assert read(payload) == b"abcdefg"
    payload.discard()
    payload.discard()  # idempotent
    assert not os.listdir(tmp_path)


def test_without_a_usable_folder_the_bytes_travel_in_the_payload(tmp_path):
    assert Spool.for_workers(1).folder is None  # no worker processes: nothing to hand over
    gone = Spool(str(tmp_path / "missing"), os.getpid())  # as when /dev/shm is full: the write fails
    payload = gone.put([b"abc", b"def"])
    assert payload.path is None and read(payload) == b"abcdef"


def test_remove_files_takes_our_own_and_dead_owners_files_only(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(dead.stdout)
    parent_pid = os.getppid()  # a running process that is not us
    for owner in (os.getpid(), dead_pid, parent_pid):
        (tmp_path / f"{PREFIX}{owner}-1-0").write_bytes(b"x")
    (tmp_path / "unrelated").write_bytes(b"x")
    assert Spool(str(tmp_path), os.getpid()).remove_files() == 2
    assert sorted(os.listdir(tmp_path)) == sorted([f"{PREFIX}{parent_pid}-1-0", "unrelated"])


def test_packed_members_land_where_the_index_says(tmp_path):
    import tarfile
    import zlib

    members = [Member("v.f00000.jpg", b"\xff\xd8" + bytes(700)), Member("v.json", b"{}")]
    out = tmp_path / "shard.tar"
    with open(out, "wb") as f:
        tar = TarShardWriter(f, sync_every=1)  # flushing to disk after every run changes nothing written
        first = tar.append(pack_members(members, Spool(str(tmp_path), os.getpid())))
        packed = pack_members(members, Spool(None, os.getpid()))
        second = tar.append(packed)
        size = tar.close()
    data = out.read_bytes()
    assert size == len(data) and first == 0 and second == packed.size
    for start in (first, second):
        for member in members:
            offset, length, crc = packed.where[member.name]
            assert data[start + offset:start + offset + length] == member.data
            assert crc == zlib.crc32(member.data)
    with tarfile.open(out) as t:
        assert [m.name for m in t.getmembers()] == [m.name for m in members] * 2
    assert not [p for p in os.listdir(tmp_path) if p.startswith(PREFIX)]  # spool files deleted once written
