"""The guidance-quality lab: small class-conditional diffusion models and an evaluator CNN trained on
scikit-learn's offline digits (``sklearn.datasets.load_digits``), shipped as safetensors beside this file.

data.py (the split and images), models.py (architectures, schedulers, loading), train.py (the diffusion
models), evaluator.py (the CNN and its features), sampling.py (guided DDIM sampling), metrics.py (FD,
precision/recall). ``benchmarks/guidance_quality.py`` is the evaluation command.
"""
