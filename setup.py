"""SwornDisk: a log-structured secure block device for Linux, in Python."""
from setuptools import find_packages, setup

setup(
    name="sworndisk",
    version="0.1.0",
    description="Log-structured secure block device (SwornDisk) with a ublk front end",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["sworndisk", "sworndisk.*", "ublk_shim", "ublk_shim.*",
                                    "sworndisk_ublk", "sworndisk_ublk.*"]),
    install_requires=["numpy>=1.22", "cryptography>=41"],
    extras_require={
        "pycryptodome": ["pycryptodome>=3.15"],
        "dev": ["pytest>=7", "hypothesis>=6"],
        "plot": ["matplotlib>=3.5"],     # python -m tools.bench --plot
    },
    entry_points={"console_scripts": ["sworndisk-ublk = sworndisk_ublk.cli:main"]},
)
