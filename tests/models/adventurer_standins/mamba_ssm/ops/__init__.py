"""Test stand-in for mamba_ssm.ops (see mamba_ssm/__init__.py)."""
