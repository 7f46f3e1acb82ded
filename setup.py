"""Packaging for rerank: fast retrieval and smart reranking for image-text search in JAX."""

import setuptools

setuptools.setup(
    name="rerank",
    version="0.1.0",
    description="Retrieve Fast, Rerank Smart: joint bi-/cross-encoders for image-text retrieval in JAX/Flax.",
    # configs/ is a package too, so `--config=configs/paper/X.py` files can import their shared
    # settings (`from configs.paper import common`) from any working directory.
    packages=setuptools.find_packages(include=["rerank", "rerank.*", "configs", "configs.*"]),
    python_requires=">=3.11",
    install_requires=[
        # JAX 0.11+ needs Python 3.12; 0.10.x is the newest line that installs on 3.11.
        "jax>=0.10,<0.11",
        "jaxlib>=0.10,<0.11",
        # Linen API as used here; 0.12 is the line that pairs with jax 0.10.
        "flax>=0.12,<0.13",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        # One path layer for local and gs:// workdirs (rerank/paths.py); orbax uses it too.
        "etils[epath]>=1.7",
        "ml-collections>=1.0",
        "absl-py>=2.0",
        # Tokenizers and configs only: transformers 5.x ships no Flax models.
        "transformers>=4.40",
        "tokenizers>=0.19",
        # Reads/builds array_record datasets without TensorFlow; needs importlib_resources then.
        "tensorflow-datasets>=4.9.7",
        "importlib_resources",
        "scann>=1.4.2",
        "numpy>=1.26",
        "tqdm",
        "safetensors",
        # TensorBoard event files without TensorFlow.
        "tensorboardX>=2.6",
        # The benchmark's log-log plot (rerank.bench).
        "matplotlib>=3.8",
    ],
    extras_require={
        # pytest-timeout: the per-test bound set in pytest.ini.
        "test": ["pytest>=8", "pytest-timeout>=2.1", "chex>=0.1.87"],
        # Reads coco_oscar .pt files (rerank.data.prepare) and PyTorch .bin/.pth checkpoints
        # (rerank.convert, weights_only=True); the parity tests need it. A plain `torch` pulls a
        # multi-GB CUDA build on most machines; keep it opt-in. >= 2.10: older weights_only
        # loaders can be made to run code (advisories for <= 2.5.1 and < 2.10); the readers
        # check the version again at run time.
        "torch": ["torch>=2.10"],
        # Accelerator builds of the same jax line: NVIDIA GPUs (CUDA 12 and cuDNN from pip
        # wheels; needs only an NVIDIA driver) and Cloud TPU VMs (libtpu from PyPI).
        "cuda": ["jax[cuda12]>=0.10,<0.11"],
        "tpu": ["jax[tpu]>=0.10,<0.11"],
        # gs:// workdirs and data dirs: etils.epath reads buckets through gcsfs; orbax and
        # tensorboardX call google-cloud-storage directly.
        "gcs": ["gcsfs", "google-cloud-storage"],
    },
)
