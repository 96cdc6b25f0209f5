from setuptools import find_packages, setup

setup(
    name="vdisk",
    version="0.1.0",
    description="Userspace virtual disk emulator: qcow2 chains served over NBD, live block streaming",
    packages=find_packages(include=["vdisk", "vdisk.*"]),
    python_requires=">=3.11",
    setup_requires=["cffi>=1.15"],
    install_requires=["cffi>=1.15", "numpy>=1.24", "zstandard>=0.19", "qemu.qmp>=0.0.3"],
    extras_require={
        "test": ["pytest", "pytest-timeout", "hypothesis"],
        "bench": ["matplotlib", "py-spy"],
        "fuzz": ["atheris"],
    },
    cffi_modules=["native/build_copier.py:ffibuilder"],
    entry_points={"console_scripts": ["vdisk = vdisk.cli.main:main"]},
)
