"""Test stand-in for mamba_ssm.ops.triton (see mamba_ssm/__init__.py)."""
