"""The package list, which pyproject.toml cannot state: the packages found under cm_lightning/ plus
cm_lightning.conf, whose files live in conf/ at the repository root (package-dir in pyproject.toml)."""

from setuptools import find_packages, setup

setup(packages=find_packages(include=["cm_lightning*"]) + ["cm_lightning.conf"])
