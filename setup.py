"""Build and install flexkv.

One top-level import name, ``flexkv``: the ``scheduler/`` and ``workers/`` folders are mapped to
``flexkv.scheduler`` and ``flexkv.workers``. Every ``c_src/build_*.py`` is a cffi (API mode,
out-of-line) build script whose module lands in ``flexkv.native``.
"""
import glob
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def cffi_modules() -> list[str]:
    """Every c_src/build_<name>.py, less the names in FLEXKV_SKIP_EXTENSIONS (comma-separated; for
    machines that lack a library, e.g. liburing, and only need the other modules)."""
    skip = {n.strip() for n in os.environ.get("FLEXKV_SKIP_EXTENSIONS", "").split(",") if n.strip()}
    scripts = sorted(glob.glob(os.path.join(HERE, "c_src", "build_*.py")))
    names = [os.path.basename(s)[len("build_"):-len(".py")] for s in scripts]
    return [f"c_src/build_{n}.py:ffibuilder" for n in names if n not in skip]


setup(
    name="flexkv",
    version="0.1.0",
    description="KV-cache manager for LLM inference engines: CPU, SSD and remote tiers",
    python_requires=">=3.11",
    packages=[
        "flexkv",
        "flexkv.native",
        "flexkv.common",
        "flexkv.cli",
        "flexkv.scheduler",
        "flexkv.workers",
        "flexkv.remote",
    ],
    package_dir={
        "flexkv": "flexkv",
        "flexkv.scheduler": "scheduler",
        "flexkv.workers": "workers",
    },
    cffi_modules=cffi_modules(),
    package_data={"flexkv.native": ["*.ptx"]},  # copy kernels built by c_src/build_cudacopy.py when nvcc exists
    install_requires=[
        "cffi>=1.16",
        "numpy>=1.24",
        "pyzmq>=25",
        "posix_ipc>=1.1",
        "msgspec>=0.18",
        "xxhash>=3.0",
        "PyYAML>=6.0",
        "redis>=5.0",
        "prometheus-client>=0.17",  # the server's /metrics endpoint (imported only when metrics_port is set)
    ],
    entry_points={"console_scripts": ["flexkv = flexkv.cli:main"]},
    extras_require={
        "hiredis": ["hiredis>=2.0"],
        "test": ["pytest>=8", "pytest-timeout>=2.2", "hypothesis>=6.100"],
        "dev": ["ruff>=0.5", "mypy>=1.10"],
    },
    zip_safe=False,
)
