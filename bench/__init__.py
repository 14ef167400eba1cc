"""Benchmarks of ``dora_kernels`` against PyTorch, ``torch.compile``, PEFT's DoRA and LoRA, and a
frozen ``nn.Linear`` (the floor). Run ``python -m bench --help``; see bench/README.md.

Nothing here imports ``dora_kernels`` at import time: ``python -m bench`` first makes sure a
CPU run takes the op's torch path (``TRITON_INTERPRET`` is read when the kernels are defined).
"""
