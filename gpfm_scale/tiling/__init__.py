"""Stage 1: whole-slide images -> WebDataset shards, per-slide coordinates, QC thumbnails and a run manifest."""
