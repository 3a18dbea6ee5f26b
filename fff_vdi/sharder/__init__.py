"""Pack a YouTube-VOS style tree of JPEG frames into WebDataset shards with a byte-offset index.

Source layout: `ROOT/JPEGImages/<video>/<frame>.jpg` (ROOT may also be the `JPEGImages/` folder
itself, or any folder of `<video>/<frame>.jpg`), with object masks in `ROOT/Annotations/<video>/
<frame>.png` or `ROOT/Masks/<video>/<frame>.png` for --with-annotations. The output format is
described in `fff_vdi.data.shards`; one tar sample per video holds every frame's original JPEG bytes.

Policy for bad input (every case is recorded in report.json and the printed summary):

  frame file unreadable, zero bytes, not a JPEG (by signature and decoder), truncated or corrupt
      -> skip the frame; the video keeps its other frames in order (frame_names keeps the
         original names, so the gap stays visible to the data pipeline)
  progressive, CMYK, grayscale or other non-baseline JPEG
      -> repair: re-encode as baseline RGB JPEG, quality 95 (GPU decoders want baseline RGB)
  frame whose size differs from the video's most common frame size (ties: the earlier frame's)
      -> skip the frame
  gap or irregular step in the numbering of frame names (step = the most common difference, so
  the 6 fps release numbered 00000, 00005, ... has no gaps)
      -> keep every frame, record a note
  video with fewer frames than --min-frames (before or after skipping frames), or with none
      -> skip the video
  video id that collides with an earlier one after sanitising to [A-Za-z0-9_-]
      -> skip the later video (in sorted order)
  files in a video folder that are not .jpg/.jpeg or are hidden (such as macOS ._00000.jpg),
  hidden folders and files beside the video folders
      -> ignore, record a note
  annotation PNG missing, undecodable, or of another size than its frame
      -> that frame has no mask (mask_frames lists the frames that have one); never skips a frame
  source missing, empty or laid out otherwise, or no usable video at all
      -> exit with an error naming the path and the expected layout, and write no manifest (when
         the videos fail only once decoded, report.json says why)

Output is a pure function of the source and the arguments that shape it (not of --workers): videos
go to a split by sha1 of their id, are taken in sorted id order, and the parent process writes the
tars in that order while worker processes read, verify and repair videos and pack each one's tar
members (tarpack.py), handing them over through shared memory (spool.py).
Tar members carry fixed metadata. Every file is written to a temporary name and renamed; `manifest.json` comes last.
After a kill at any moment, --resume keeps the shards whose tar and index were both renamed,
removes the rest, and continues from the next video: the result is byte-identical to an
uninterrupted run. `report.json` doubles as the journal of a run in progress (its records of
finished shards are kept on resume). In a finished folder, --repair makes again from the source only
the shards whose tar or index is missing or differs from the manifest (what --verify lists), byte-
identical to the first run, and replaces them only once their sha256 is the manifest's; a source
that changed since is refused, and nothing is changed.

Modules, in the order a run uses them:

    options.py   the arguments that shape the output, sizes, worker counts
    scan.py      find the source layout and list every video's frames and masks (no decoding)
    frames.py    JPEG and PNG checks: decode fully, find what a GPU decoder cannot take, re-encode it
    videos.py    one video -> one packed tar sample (runs in the worker processes)
    tarpack.py   tar members with fixed metadata, appended by a writer thread
    spool.py     the workers' hand-over of packed bytes through /dev/shm
    records.py   report records, the journal (report.json) and the printed summary
    writer.py    the parent: fill shards in order, each tar and index written atomically
    resume.py    what an output folder holds, and where an interrupted run continues
    manifest.py  the finished folder's list of shards with their hashes, and its totals
    run.py       one sharding run
    verify.py    re-hash and decode a finished folder against its manifest
    repair.py    make the damaged shards of a finished folder again, byte-identical
"""
