"""minidiff's compiled kernels, each beside its launcher, its NumPy reference and (CUDA) its emulator:

    lowbit_matmul.c             CPU: 4-bit experts and widening without NumPy passes    (lowbit_matmul.py launches;
                                lowbit_matmul_reference.py states it; tests/test_native.py validates)
    moe_experts.cu              GPU: grouped bf16/int4 expert GEMMs on tensor cores      (moe_experts.py launches;
                                moe_experts_reference.py states it; moe_experts_emulator.py replays it lane by
                                lane on the CPU; tests/test_gpu_kernels.py and test_kernel_emulator.py validate)

The loader binds a kernel to the weights it reads (`loader.load`); the model asks for it through one
protocol (minidiff/ops.py's docstring) and never imports this package.
"""
