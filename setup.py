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
    # kernels/, configs/ and ds_configs/ sit at the top level of the repository (docs/ARCHITECTURE.md's layout)
    # and are installed inside the package, so a non-editable install finds `deepspeed.config=zero2` and the YAMLs.
    packages=["mixdpo_ds", "mixdpo_ds.core", "mixdpo_ds.model", "mixdpo_ds.training", "mixdpo_ds.apps",
              "mixdpo_ds.apps.datasets", "mixdpo_ds.kernels", "mixdpo_ds.configs", "mixdpo_ds.ds_configs"],
    package_dir={"mixdpo_ds": "mixdpo_ds", "mixdpo_ds.kernels": "kernels", "mixdpo_ds.configs": "configs",
                 "mixdpo_ds.ds_configs": "ds_configs"},
    package_data={"mixdpo_ds.configs": ["*.yaml"], "mixdpo_ds.ds_configs": ["*.json"]},
    # Upper bounds: the tests ran with deepspeed 0.19.8, transformers 5.24.0, peft 0.21.2 and datasets 5.2.0, and
    # mixdpo_ds/compat.py uses private APIs of each. Before raising a bound, check every entry of compat.py's
    # docstring against the new release and run tests/unit/test_compat.py (plus the tests it names).
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16,<0.20",
        "transformers>=4.45,<5.25",
        "datasets>=2.20,<5.3",
        "triton>=3.0",
        "safetensors>=0.4",
        "pyyaml>=6",
        "numpy",
        "tqdm",
        "matplotlib",
        "vaderSentiment>=3.3",
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-timeout", "ruff", "liger-kernel", "peft>=0.12,<0.22", "tensorboard",
                "trl==1.16.0", "wandb", "mlflow-skinny"],  # trl: the K = 1 parity test against DPOTrainer
        "peft": ["peft>=0.12,<0.22"],
        "tensorboard": ["tensorboard"],
        "trackers": ["tensorboard", "wandb", "mlflow-skinny"],  # report_to (training/trackers.py)
    },
    entry_points={"console_scripts": ["mixdpo=mixdpo_ds.cli:main"]},
)
