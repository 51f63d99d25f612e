from setuptools import find_packages, setup

setup(
    name="composer",
    version="0.1.0",
    description="LoRA-Composer (training-free multi-concept composition) on a from-scratch SD1.5 stack",
    packages=find_packages(include=["composer", "composer.*", "kernels", "kernels.*", "weights_tools", "weights_tools.*"]),
    package_data={"composer": ["data/clip/*"]},
    python_requires=">=3.10",
    # Triton publishes Linux wheels only; elsewhere composer runs its CPU paths (kernels' segmented backend)
    install_requires=["torch>=2.4", "safetensors", "tokenizers", "numpy", "einops", "triton; sys_platform == 'linux'",
                      "Pillow", "tqdm"],
    extras_require={"test": ["pytest", "diffusers>=0.30", "transformers>=4.40", "peft>=0.12", "accelerate"]},
)
