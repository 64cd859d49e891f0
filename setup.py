"""Packaging glue that pyproject.toml cannot say alone: `kernels/` ships as `minillm.kernels`.

Never import it as a bare top-level `kernels` (transformers probes a PyPI package of that name).
"""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["minillm", "minillm.*"]) + ["minillm.kernels"],
    package_dir={"minillm.kernels": "kernels"},
)
