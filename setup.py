"""dpft: differentially private fine-tuning of pre-trained image classifiers in JAX/Flax."""
import setuptools

setuptools.setup(
    name="dpft",
    version="0.1.0",
    description="Differentially private fine-tuning of pre-trained image classifiers (JAX/Flax NNX).",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["dpft", "dpft.*"]),
    package_data={"dpft": ["py.typed"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6,<0.11",
        "flax>=0.11,<0.13",
        "optax>=0.2.4,<0.3",
        "dp-accounting>=0.4.4,<0.7",
        "ml-collections>=0.1.1,<2",
        "chex>=0.1.89,<0.2",
        "orbax-checkpoint>=0.11,<0.13",
        "grain>=0.2.10,<0.3",
        "tensorflow-datasets>=4.9.4,<5",
        "numpy>=1.26,<3",
        "scikit-learn>=1.4,<2",
        "scipy>=1.11,<2",  # Binomial weights of the patient epsilon (dpft.privacy.group), audit statistics
        "fairlearn>=0.11,<0.16",
        "pandas>=2.1,<4",
        "pillow>=10,<14",
        "openpyxl>=3.1,<4",
        "matplotlib>=3.8,<4",
        "tensorboardX>=2.6,<3",
        "absl-py>=2.0,<3",
        "tqdm>=4.66,<5",
        "etils[epath]>=1.7",  # local and gs:// / s3:// paths (dpft.paths, dpft.atomic_io)
        "fsspec>=2024.12",  # pipe_file(mode="create"): the remote workdir lock
        # BandMF (privacy.mechanism="bandmf"): strategy optimisation, sensitivity, amplified accounting
        "jax-privacy>=2.0,<3",
    ],
    extras_require={
        # Haiku models through dpft.privacy.adapters.haiku_loss_fn (DeepMind checkpoints are read without it).
        "haiku": ["dm-haiku>=0.0.13,<0.1"],
        # gs:// workdirs: gcsfs sends create-if-absent as ifGenerationMatch=0 (added in 2024.12)
        "gcs": ["gcsfs>=2024.12"],
        "s3": ["s3fs>=2024.12"],
        "test": [
            "dm-haiku>=0.0.13,<0.1",  # the independent Haiku reference of the NFNet and the adapter tests
            "pytest>=8,<10",
            "pytest-xdist>=3.8,<4",  # 3.8: --no-loadscope-reorder (Makefile)
            "hypothesis>=6.100,<7",
            "nbclient>=0.10,<1",
            "nbformat>=5.10,<6",
            "ipykernel>=6.29,<8",
            "gcsfs>=2024.12",  # the real gs:// client's credential check (tests/test_remote_paths.py)
        ],
        "bench": [
            "torch==2.13.0",
            "opacus>=1.5,<2",
            "jax-privacy>=1.0",
        ],
    },
    entry_points={"console_scripts": ["dpft=dpft.cli:main"]},
)
