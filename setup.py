"""megalm: distributed training of Llama-style language models (TP x PP x DP/ZeRO on DeepSpeed)."""
from setuptools import find_packages, setup

# torch is pinned without a local tag so that both the CPU build (2.13.0+cpu) and the CUDA build
# (2.13.0) satisfy it; scripts/bootstrap.sh installs the right one *before* this package so that pip
# never resolves a multi-GB CUDA wheel on a CPU-only machine.
RUNTIME = [
    "torch==2.13.0",
    "deepspeed==0.19.8",
    "numpy==2.4.6",
    "pyarrow==26.0.1",
    "tensorboard==2.21.0",
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
    "PyYAML==6.0.3",
    "tqdm==4.70.1",
    "zstandard==0.25.0",
    "tiktoken==0.14.0",  # data_prep's fast byte-level BPE path (ids checked equal to tokenizers')
]

setup(
    name="megalm",
    version="0.1.0",
    description="3D-parallel (TP x PP x DP/ZeRO) training of Llama-style decoders on DeepSpeed",
    packages=find_packages(include=["megalm", "megalm.*", "data_prep", "data_prep.*", "launcher", "launcher.*"]),
    # The named model shapes (`model: tiny`, ... `70b`) are read at run time, so they ship with the code.
    # The shipped lm-eval tasks (`megalm-eval --tasks`) are YAML + JSONL files read at run time too.
    package_data={"launcher": ["templates/*.tmpl"], "megalm.config": ["models/*.yaml"],
                  "megalm.eval": ["tasks/*.yaml", "tasks/*.jsonl"]},
    python_requires=">=3.10",
    install_requires=RUNTIME,
    extras_require={
        "mpi": ["mpich==5.0.2", "mpi4py==4.1.2"],
        # `megalm-eval --tasks`: task scoring through lm-evaluation-harness
        "tasks": ["lm-eval==0.4.13"],
        # transformers builds the HF test models; accelerate + peft are what lm-eval's own `hf` model needs
        "test": ["pytest==9.0.3", "pytest-timeout==2.4.0", "transformers==5.23.0", "accelerate==1.15.0",
                 "peft==0.21.2"],
    },
    entry_points={
        "console_scripts": [
            "megalm-prep=data_prep.cli:main",
            "megalm-train=megalm.train:main",
            "megalm-launch=launcher.cli:main",
            "megalm-eval=megalm.eval.evaluate:main",
            "megalm-generate=megalm.eval.generate:main",
            "megalm-export=megalm.export.hf:main",
            "megalm-reshard=megalm.export.reshard:main",
            "megalm-import=megalm.export.hf_import:main",
            "megalm-plan=megalm.plan.cli:main",
        ]
    },
)
