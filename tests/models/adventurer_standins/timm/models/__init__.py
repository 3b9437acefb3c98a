"""Test stand-in for timm.models (see timm/__init__.py)."""
