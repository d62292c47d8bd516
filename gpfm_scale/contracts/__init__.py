"""The data contracts that cross stage boundaries, each owned here once so that a writer and its readers import the
same definition instead of each other (DESIGN.md, "Data contracts").

- `export`: the exported teacher (`model.safetensors` + `config.json`), written by `train`, read by `embed`, by
  `train` itself for a warm start, and by plain timm.
"""
