from setuptools import find_packages, setup

setup(
    name="kvideo",
    version="0.1.0",
    description="Cascaded text-to-video latent diffusion in the recipe of Kandinsky Video 1.1, with training code",
    packages=find_packages(include=["kvideo", "kvideo.*"]),
    package_data={"kvideo.release": ["inventory.json.gz"]},  # the released checkpoints' key names and shapes
    python_requires=">=3.10",
    install_requires=[
        "torch", "torchvision", "einops", "omegaconf", "open-clip-torch", "opencv-python",
        "scenedetect", "av", "webdataset", "safetensors", "numpy", "tqdm",
    ],
    extras_require={
        "xformers": ["xformers"],
        # FID / KID / FVD (kvideo.metrics.frechet): scipy's matrix square root, as the references use
        "metrics": ["scipy"],
        # tools/human_eval.py: the side-by-side voting page
        "human-eval": ["flask"],
        # pytorch-fid: the reference FID implementation the metric tests compare against
        # selenium drives Debian's chromium in the human-evaluation browser test
        # the LLM first-frame rewriter (kvideo.inference.rewrite) and T5 text towers
        "llm": ["transformers"],
        # LoRA fine-tuning (anchor grounding, Factorized Video Generation)
        "lora": ["peft"],
        "dev": ["pytest", "pytest-timeout", "diffusers", "scipy", "pytorch-fid", "flask", "selenium", "transformers",
                "peft"],
    },
)
