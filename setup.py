from setuptools import find_packages, setup

setup(
    name="omni-engine",
    version="0.1.0",
    description="PyTorch-native engine for training omni-modal LLMs with FSDP/HSDP, Ulysses SP and EP",
    python_requires=">=3.10",
    packages=find_packages(include=["engine", "engine.*", "omni_datasets", "omni_datasets.*"]),
    py_modules=["pretrain_omni"],
    # torch is deliberately a range: on a CPU machine install `torch==2.13.0` first (or in the
    # same pip call) so the local CPU build satisfies it and no CUDA wheels are pulled.
    install_requires=[
        "torch>=2.6",
        "numpy",
        "pyyaml",
        "sentencepiece",
        "tqdm",
        "tensorboard",
        "safetensors",
        "tokenizers",  # tokenizer.json files and data.tokenizer=bpe
        "jinja2",  # chat templates (data.dataset=conversations)
        "pyarrow",  # Parquet data files
        # media inside conversations: images, audio (read, resampled to 16 kHz), video
        "pillow",
        "soundfile",
        "soxr",
        "av",
    ],
    extras_require={
        # the omni-digits demo dataset (omni_datasets/): scikit-learn's digits, PNG grids, resampling
        # and the fine-tuning example's tiny transformers-saved Qwen2 (omni_datasets/sft_text)
        "demo": ["scikit-learn", "pillow", "scipy", "transformers>=4.51"],
        # torchao: tests/test_fp8.py (a 3.4 MB wheel with no dependencies: it pulls no CUDA torch)
        "test": ["pytest", "pytest-timeout", "pytest-xdist", "transformers>=4.51", "scikit-learn", "pillow", "scipy",
                 "torchao>=0.18"],
        # train.dtype=fp8 with train.fp8_backend=torchao (tested: torchao 0.18.0 with torch 2.13, CPU)
        "fp8": ["torchao>=0.18"],
        "plots": ["matplotlib"],  # tools/plot_losses.py
        # CUDA machines: NVML metrics and Liger-Kernel's fused loss (pure Python over Triton)
        "gpu": ["nvidia-ml-py", "liger-kernel"],
        # Each builds against CUDA from source for a long time: extras of their own, never pulled by [gpu].
        "flash": ["flash-attn"],  # model.attention_backend=flash_attn (torch's own varlen kernel needs nothing)
        "te": ["transformer-engine[pytorch]"],  # train.fp8_backend=te
    },
)
