"""Test stand-in: collectives are not used (their code calls them with a process group)."""


def all_reduce(*args, **kwargs):
  raise NotImplementedError("test stand-in: no tensor parallelism")


reduce_scatter = all_reduce
