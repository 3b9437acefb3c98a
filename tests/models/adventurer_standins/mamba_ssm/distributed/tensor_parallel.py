"""Test stand-in: tensor parallelism is not used (their code takes it with a process group)."""


class ColumnParallelLinear:
  def __init__(self, *args, **kwargs):
    raise NotImplementedError("test stand-in: no tensor parallelism")


RowParallelLinear = ColumnParallelLinear
