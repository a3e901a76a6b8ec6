"""supcon_scale: Supervised Contrastive training at ImageNet scale, and its evaluation."""

from setuptools import find_packages, setup

setup(
    name="supcon_scale",
    version="0.1.0",
    description="Supervised Contrastive (SupCon) encoders at ImageNet scale: DALI, DDP/FSDP/DeepSpeed, exact all-gather loss",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["supcon_scale", "supcon_scale.*"]),
    install_requires=[
        "torch>=2.6",
        "torchvision>=0.21",
        "timm>=1.0",
        "safetensors>=0.4",
        "rich>=13",
        "pyyaml>=6",
        "numpy>=1.24",
        "pillow>=10",
        "scikit-learn>=1.3",
        "matplotlib>=3.7",
        "imagecorruptions>=1.1.2",
        "psutil>=5.9",
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda120>=1.40"],
        "dali-cuda130": ["nvidia-dali-cuda130>=1.40"],
        "deepspeed": ["deepspeed>=0.15"],
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "pytorch-metric-learning>=2.5", "hypothesis>=6.100", "ruff>=0.15"],
    },
    entry_points={"console_scripts": ["supcon-scale=supcon_scale.cli:main"]},
)
