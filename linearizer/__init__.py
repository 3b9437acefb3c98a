"""linearizer: distill a frozen ViT teacher into a linear-time Adventurer (Mamba-2) student."""


def load_student(directory):
  """One line for notebooks: the exported student as an nnx module."""
  from linearizer import export  # pylint: disable=import-outside-toplevel
  return export.load_student(directory)
