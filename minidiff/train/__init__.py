"""Training DiffusionGemma with minidiff's own code: hand-written gradients (ops.py, each op's backward
beside its forward). Work in progress: the ops and their checks are here; the layer, the loss of the
release's objective (docs/sampler.md §S18–§S20), the optimizer and `minidiff train` come next."""
