"""The compiled kernels, each beside its launcher, its NumPy reference and (CUDA) its emulator: README.md."""
