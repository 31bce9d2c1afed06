"""Install ppkd-fairseq, a fairseq user dir for kNN-LM evaluation with PP-KD."""

from setuptools import find_packages, setup

setup(
    name="ppkd-fairseq",
    version="0.1.0",
    description=(
        "kNN-LM evaluation with plug-and-play knowledge distillation "
        "(PP-KD) as a fairseq --user-dir plugin"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.8",
    packages=find_packages(include=["ppkd_fairseq", "ppkd_fairseq.*"]),
    install_requires=[
        "torch>=1.13",
        # fairseq 0.12.2 fails to import on Python 3.11 (a dataclass with a
        # mutable default); fairseq-fixed is the same package with that fixed.
        "fairseq==0.12.2; python_version < '3.11'",
        "fairseq-fixed==0.12.3.1; python_version >= '3.11'",
        "numpy",
        "sacremoses",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        # Exactly one FAISS build: faiss-cpu by default, faiss-gpu on GPUs.
        "cpu": ["faiss-cpu==1.15.1"],
        "gpu": ["faiss-gpu"],
        "test": ["pytest"],
    },
    entry_points={
        "console_scripts": [
            "ppkd-prepare-data = ppkd_fairseq.cli.prepare_data:main",
            "ppkd-build-index = ppkd_fairseq.cli.build_index:main",
            "ppkd-datastore = ppkd_fairseq.cli.datastore:main",
            "ppkd-sweep = ppkd_fairseq.cli.sweep:main",
        ],
    },
)
