"""fff_vdi/utils/paths.py: the one natural sort of file names (the sharder's frames, inpaint's inputs)."""

from __future__ import annotations

import random

from fff_vdi.utils.paths import natural_key


def test_natural_key_orders_numbers_by_value_and_never_ties():
    names = ["frame10.png", "frame2.png", "frame1.png", "frame01.png", "00005.jpg", "00010.jpg", "b.jpg", "a10.jpg",
             "a9.jpg"]
    expected = ["00005.jpg", "00010.jpg", "a9.jpg", "a10.jpg", "b.jpg", "frame01.png", "frame1.png", "frame2.png",
                "frame10.png"]
    for seed in range(5):  # whatever order the folder was listed in
        random.Random(seed).shuffle(names)
        assert sorted(names, key=natural_key) == expected
    assert natural_key("01.jpg") != natural_key("1.jpg")
