"""Test stand-in for timm (tests/models/test_adventurer_code.py): only the names
wangf3014/Adventurer's `models_mamba.py` imports, pure torch. It is put first on sys.path
only in the subprocess that runs their code, so it never shadows an installed timm.
"""
