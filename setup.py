from setuptools import find_packages, setup

setup(
    name="lit-llama",
    version="0.1.0",
    description="A compact, hackable toolkit to finetune LLaMA-family models with LoRA, adapters or fully",
    packages=find_packages(include=["lit_llama", "lit_llama.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.5",
        "lightning>=2.4",
        "sentencepiece",
        "protobuf",  # to read a SentencePiece model's pieces and settings
        "jinja2>=3.1",  # to render the chat templates of Instruct checkpoints
        "tokenizers",
        "safetensors",
        "tqdm",
        "numpy",
        "jsonargparse[signatures]>=4.27",
        "matplotlib",
    ],
    extras_require={
        "gguf": ["gguf>=0.10"],
        # QLoRA's NF4 base and int8/int4 weight-only generation (lit_llama/quantize.py)
        "quantize": ["torchao==0.18.*"],
        "serve": ["fastapi==0.165.0", "uvicorn==0.54.0"],  # scripts/serve.py
        # scripts/evaluate_harness.py: EleutherAI's lm-evaluation-harness (pulls in datasets, pandas, pyarrow, scipy,
        # scikit-learn: about 600 MB installed, so not in "test"; requirements.txt installs it for CI)
        "harness": ["lm-eval>=0.4.13,<0.5"],
        "tensorboard": ["tensorboard>=2.14"],  # --logger tensorboard
        "wandb": ["wandb>=0.17"],  # --logger wandb
        "test": ["pytest", "hypothesis", "transformers>=4.45", "peft", "gguf>=0.10", "psutil", "torchao==0.18.*",
                 "fastapi==0.165.0", "uvicorn==0.54.0", "openai==3.57.0", "tensorboard>=2.14"],
    },
)
