"""Packaging for fastdist: the `fastdist` library and the `kernels` Triton package."""

import platform

from setuptools import find_packages, setup

# Triton wheels exist for Linux x86_64/aarch64 only; elsewhere the torch backend is used.
TRITON = ["triton>=3.4"] if platform.system() == "Linux" else []

setup(
    name="fastdist",
    version="0.1.0",
    description="Fused DIST knowledge distillation for semantic segmentation (Triton + PyTorch)",
    python_requires=">=3.10",
    packages=find_packages(include=["fastdist", "fastdist.*", "kernels", "kernels.*"]),
    install_requires=["torch>=2.11", "numpy", "pillow"] + TRITON,
    extras_require={
        "dali": ["nvidia-dali-cuda120"],
        "dev": ["pytest", "pytest-timeout", "ruff", "matplotlib"],
        # --tensorboard / --wandb (fastdist.engine.dashboards)
        "dashboards": ["tensorboard", "wandb"],
        # export.py: torch's dynamo ONNX exporter needs onnxscript; onnxruntime checks the graph
        "export": ["onnx", "onnxruntime", "onnxscript"],
    },
)
