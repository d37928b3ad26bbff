"""Build script for nativevit.

The pure-PyTorch package ``nativevit`` and the Triton kernels in ``kernels/`` (installed as the
subpackage ``nativevit.kernels``; the top-level name ``kernels`` belongs to another project).
"""

from setuptools import setup

setup(
    name="nativevit",
    version="0.1.0",
    description="Native-resolution ViT encoder: packed varlen batches, fused 2D RoPE, varlen attention",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["nativevit", "nativevit.kernels"],
    package_dir={"nativevit": "nativevit", "nativevit.kernels": "kernels"},
    install_requires=[
        "torch>=2.6",
        "torchvision",
        "triton",
        "einops",
        "timm",
        "numpy",
        "pillow",
        "safetensors",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest", "transformers>=5.23,<6"],
        "plot": ["matplotlib"],
    },
    entry_points={"console_scripts": ["nativevit = nativevit.cli:main"]},
)
