"""gpfm-scale: GPFM-style pathology foundation models at cluster scale."""
