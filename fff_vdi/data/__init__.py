"""Data: shards on disk, the clip stream, masks, and the DALI / CPU loaders."""
