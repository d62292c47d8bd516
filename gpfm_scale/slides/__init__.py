"""Whole-slide access: reader backends, MPP resolution, tissue masks, tile grids, QC, synthetic slides."""
