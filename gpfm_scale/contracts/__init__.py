"""The data contracts that cross stage boundaries, each owned here once so that a writer and its readers import the
same definition instead of each other (DESIGN.md, "Data contracts"). Stages (tiling, train, embed, evaluate) share
data only through this package; it builds on the base modules alone (config, errors, names, atomic).

- `shards`: the shard sample (key `{slide_id}/{x}_{y}`, image + json members, `SAMPLE_FIELDS`, shard names) and the
  whole-slide tar writer; written by `tiling` and `data.mixing`, read by `data` and `embed`.
- `output_dir`: a tiling output directory (local or fsspec), its layout and atomic publishing.
- `run_manifest`: the tiling run manifest's schema, journal format and reading side (`read_state`); `tiling`
  writes it, `embed` reads it.
- `coords`: the per-slide CLAM/TRIDENT coordinates `.h5`; written by `tiling`, its geometry copied by `embed`.
- `model_input`: a model's input contract (size, mean, std), ImageNet statistics once.
- `export`: the exported teacher (`model.safetensors` + `config.json`), written by `train`, read by `embed`, by
  `train` itself for a warm start, and by plain timm.
- `features`: the feature store (per-slide `.h5`, `images.h5`, `index.parquet`); written by `embed`, read by
  `evaluate` and the demo.
"""
