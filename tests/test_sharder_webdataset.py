"""Our shards are WebDataset tars: the `webdataset` library reads them, by its brace-expanded shard
names, into exactly the samples, keys and bytes that our index lists, and decodes them with its own
decoders."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from fff_vdi.data.shards import ShardSet, frame_member_name, mask_member_name, meta_member_name, read_member
from fff_vdi.data.synthetic import write_synthetic_videos
from fff_vdi.sharder.options import ShardOptions, parse_size
from fff_vdi.sharder.run import run_sharding


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """6 videos of 5 frames with masks, one frame without its mask, in several shards and two splits."""
    src = write_synthetic_videos(tmp_path_factory.mktemp("src"), 6, 5, 48, 64, seed=7)
    (src / "Annotations/synth0001/00003.png").unlink()
    out = tmp_path_factory.mktemp("shards") / "out"
    with contextlib.redirect_stdout(io.StringIO()):
        run_sharding(ShardOptions(src=src, out=out, shard_size=parse_size("60KB"), val_fraction=0.3,
                                  with_annotations=True))
    return out


def indexed_samples(shards: Path, entries: list[dict]) -> dict[str, tuple[str, dict[str, bytes]]]:
    """Per key, its shard and every member's bytes, read where our index says they are (crc-checked)."""
    samples = {}
    for entry in entries:
        index = json.loads((shards / entry["index"]).read_text())
        with open(shards / entry["name"], "rb") as tar:
            for sample in index["samples"]:
                key = sample["key"]
                named = [(meta_member_name(key), sample["json"])]
                named += [(frame_member_name(key, i), m) for i, m in enumerate(sample["frames"])]
                named += [(mask_member_name(key, i), m) for i, m in enumerate(sample["masks"]) if m is not None]
                samples[key] = (entry["name"], {name[len(key) + 1:]: read_member(tar.fileno(), m) for name, m in named})
    return samples


@pytest.mark.parametrize("split", ["train", "val"])
def test_webdataset_reads_the_samples_keys_and_bytes_of_the_index(shards, split):
    manifest = json.loads((shards / "manifest.json").read_text())
    count = len(manifest["splits"][split]["shards"])
    assert count >= 2 or split == "val"
    urls = str(shards / f"{split}-{{000000..{count - 1:06d}}}.tar")  # WebDataset's own shard notation
    read = [(s["__key__"], Path(s["__url__"]).name, {k: v for k, v in s.items() if not k.startswith("__")})
            for s in wds.WebDataset(urls, shardshuffle=False)]
    expected = indexed_samples(shards, manifest["splits"][split]["shards"])
    assert [key for key, _, _ in read] == list(expected)  # every video, in the index's order
    assert sum(len(members) for _, _, members in read) > 3 * len(read)  # frames, metadata and masks
    for key, shard, members in read:
        assert (shard, members) == expected[key]  # in its shard, the same member names and the same bytes


def test_webdataset_decoders_read_frames_masks_and_metadata(shards):
    reader = ShardSet.open(shards, "train")
    videos = {v.key: v for v in reader.videos}
    urls = [str(shards / entry["name"]) for entry in json.loads((shards / "manifest.json").read_text())
            ["splits"]["train"]["shards"]]
    decoded = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert len(decoded) == len(videos)
    for sample in decoded:
        video = videos[sample["__key__"]]
        assert sample["json"] == reader.read_meta(video)  # parsed by webdataset's JSON decoder
        frames = [sample[f"f{i:05d}.jpg"] for i in range(video.num_frames)]
        assert {frame.size for frame in frames} == {(video.width, video.height)}
        for i in sample["json"]["mask_frames"]:
            mask = np.asarray(sample[f"m{i:05d}.png"])  # "pil" gives RGB: the palette's colours of ids 0, 1, 2
            assert mask.shape == (video.height, video.width, 3)
            assert {tuple(c) for c in mask.reshape(-1, 3)} <= {(0, 0, 0), (128, 0, 0), (0, 128, 0)}
        masks = sorted(k for k in sample if k.endswith(".png"))
        assert masks == [f"m{i:05d}.png" for i in sample["json"]["mask_frames"]]
