"""Test stand-in for mamba-ssm (tests/models/test_adventurer_code.py): pure torch, no CUDA kernels.

Only the names wangf3014/Adventurer's `mamba_custom.py` and `models_mamba.py` import, with
mamba-ssm's signatures; the SSM is the sequential scan, token by token, in float64 (the
reference the fused kernels approximate). `selective_state_update` (decoding) is left out:
their code imports it under `try` and does not use it here.
"""
