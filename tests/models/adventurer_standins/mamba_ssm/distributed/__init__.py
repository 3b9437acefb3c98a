"""Test stand-in for mamba_ssm.distributed (see mamba_ssm/__init__.py)."""
