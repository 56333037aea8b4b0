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
    # kernels/, configs/ and ds_configs/ sit at the top level of the repository (STYLE.md's layout) and are
    # installed inside the package, so a non-editable install finds `deepspeed.config=zero2` and the run YAMLs.
    packages=["mixdpo_ds", "mixdpo_ds.core", "mixdpo_ds.model", "mixdpo_ds.training", "mixdpo_ds.apps",
              "mixdpo_ds.apps.datasets", "mixdpo_ds.kernels", "mixdpo_ds.configs", "mixdpo_ds.ds_configs"],
    package_dir={"mixdpo_ds": "mixdpo_ds", "mixdpo_ds.kernels": "kernels", "mixdpo_ds.configs": "configs",
                 "mixdpo_ds.ds_configs": "ds_configs"},
    package_data={"mixdpo_ds.configs": ["*.yaml"], "mixdpo_ds.ds_configs": ["*.json"]},
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
