"""Training DiffusionGemma with minidiff's own code and hand-written gradients: ops.py (each op's backward
beside its forward), layer.py (one layer, both ways), objective.py (the release's loss, docs/sampler.md
§S18–§S20), trainer.py (AdamW, checkpoints, `minidiff train`)."""
