"""Maps the repository's probe/, server/ and dashboard/ folders (and their subpackages)
onto the rankguard.* import namespace; everything else lives in pyproject.toml."""

from setuptools import find_packages, setup

TOP_LEVEL = ("probe", "server", "dashboard")

setup(
    packages=[
        f"rankguard.{name}" for name in find_packages(include=[f"{top}*" for top in TOP_LEVEL])
    ],
)
