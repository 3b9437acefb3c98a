"""Formats that leave JAX: ONNX (`to_onnx`), PyTorch (`to_torch`, with the standalone
`torch_adventurer.py` that runs the `.pth`), and their CLI (`python -m linearizer.export`).

Nothing here is imported by a run: the JAX export every run writes is `linearizer.serving`.
"""
