"""mixdpo-ds: Mix-DPO and MoE-DPO (mixtures of DPO experts) on DeepSpeed.

Install (CPU machine, torch pinned to the local CPU build):
    pip install torch==2.13.0 -e ".[dev]"
"""
from setuptools import setup

setup(
    name="mixdpo-ds",
    version="0.1.0",
    description="Mixture-of-experts DPO (Mix-DPO / MoE-DPO) trainer on DeepSpeed",
    python_requires=">=3.10",
    packages=["mixdpo_ds", "mixdpo_ds.kernels", "mixdpo_ds.datasets"],
    package_dir={"mixdpo_ds": "mixdpo_ds", "mixdpo_ds.kernels": "kernels"},
    package_data={"mixdpo_ds": ["configs/*.yaml", "ds_configs/*.json"]},
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
        "transformers>=4.45",
        "datasets>=2.20",
        "triton>=3.0",
        "safetensors>=0.4",
        "pyyaml>=6",
        "numpy",
        "tqdm",
        "matplotlib",
        "vaderSentiment>=3.3",
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-timeout", "ruff", "liger-kernel", "peft", "tensorboard"],
        "peft": ["peft>=0.12"],
        "tensorboard": ["tensorboard"],
    },
    entry_points={"console_scripts": ["mixdpo=mixdpo_ds.cli:main"]},
)
