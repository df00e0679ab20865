"""Installs metis_jax: `pip install -e ".[test]"` (see README.md)."""

import setuptools

INSTALL_REQUIRES = [
    "jax>=0.4.35",
    "flax>=0.10.0",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11.0",
    "grain>=0.2.10",
    "array_record>=0.7.0",
    "ml_collections>=0.1.1",
    "absl-py>=2.0.0",
    "numpy>=1.26",
    "scipy>=1.11",
    "soundfile>=0.12.1",
    "safetensors>=0.4.0",
    "tensorboardX>=2.6",
    "espeakng-loader>=0.2.4",
    "msgpack>=1.0",
]

EXTRAS_REQUIRE = {
    # Tests. The comparisons with Hugging Face's classes read frozen fixtures
    # (../shared/data/parity/hf_*), so no torch; where torch and transformers
    # happen to be installed, an optional live comparison runs as well.
    "test": [
        "pytest>=8.0",
        "phonemizer>=3.3.0",
    ],
    # `python -m metis_jax.fetch`: download the released weights (never at run time).
    "fetch": ["huggingface_hub>=0.23"],
    # TPU runtime; also what the AOT dry run (train_compile) needs on a CPU host.
    "tpu": ["jax[tpu]>=0.4.35"],
    # `tfds build` of corpora into ArrayRecord (pulls TensorFlow).
    "tfds": ["tensorflow-datasets>=4.9.6", "tensorflow>=2.16"],
    # Grapheme-to-phoneme front-end for TTS decoding.
    "g2p": ["phonemizer>=3.3.0"],
}

setuptools.setup(
    name="metis_jax",
    version="0.1.0",
    description="Metis (masked generative speech foundation model) in JAX/Flax: pre-training, fine-tuning, decoding.",
    packages=setuptools.find_packages(include=["metis_jax", "metis_jax.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
