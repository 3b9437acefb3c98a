"""TorchScript archives (OpenAI's released CLIP `.pt` files) read as tensors, running nothing.

`torch.jit.load` would rebuild the scripted modules, and a module's `__setstate__` is code
from the file that runs before anything can be checked. Instead the archive's `data.pkl` is
read with an unpickler that knows only what a module tree of tensors needs: scripted
objects become plain records of their attributes, tensors are rebuilt from the archive's
storages with numpy, and any other global is refused. The names are the attribute paths,
which are the names of the module's `state_dict` (e.g. `visual.conv1.weight`).
"""

import collections
import pickle
import zipfile

import numpy as np

# torch's storage classes -> numpy dtypes ("bfloat16" through ml_dtypes, when present).
_STORAGES = {
  "FloatStorage": np.float32,
  "DoubleStorage": np.float64,
  "HalfStorage": np.float16,
  "BFloat16Storage": "bfloat16",
  "LongStorage": np.int64,
  "IntStorage": np.int32,
  "ShortStorage": np.int16,
  "CharStorage": np.int8,
  "ByteStorage": np.uint8,
  "BoolStorage": np.bool_,
}


class ScriptObject:
  """A scripted object of the archive: its pickled attributes and nothing of its code."""

  def __setstate__(self, state):
    self.state = state


def _rebuild_tensor(storage, offset, size, stride, *unused):
  """torch._utils._rebuild_tensor_v2, in numpy: a strided view of the storage, copied."""
  step = storage.itemsize
  view = np.lib.stride_tricks.as_strided(
    storage[offset:], shape=tuple(size), strides=tuple(s * step for s in stride)
  )
  return np.array(view)


def _first(value, *unused):
  return value


# The only globals an archive of module attributes and tensors needs (ours, not torch's).
_ALLOWED = {
  ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
  ("torch._utils", "_rebuild_parameter"): _first,
  ("collections", "OrderedDict"): collections.OrderedDict,
  ("torch.jit._pickle", "restore_type_tag"): _first,
  **{("torch.jit._pickle", f"build_{t}list"): _first for t in ("int", "double", "bool", "tensor")},
}


class _Unpickler(pickle.Unpickler):
  def __init__(self, archive: zipfile.ZipFile, prefix: str):
    super().__init__(archive.open(f"{prefix}/data.pkl"))
    self.archive, self.prefix = archive, prefix

  def find_class(self, module, name):
    if module == "__torch__" or module.startswith("__torch__."):
      return ScriptObject
    if module == "torch" and name in _STORAGES:
      return name
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    raise pickle.UnpicklingError(
      f"the archive refers to {module}.{name}, which is neither a module attribute nor a "
      "tensor; it is not loaded (nothing in the file is run)"
    )

  def persistent_load(self, pid):
    _, storage, key, _, numel = pid  # ('storage', storage class, key, location, numel)
    dtype = _STORAGES[storage]
    if dtype == "bfloat16":
      import ml_dtypes  # optional dependency: only bfloat16 files need it

      dtype = ml_dtypes.bfloat16
    data = self.archive.read(f"{self.prefix}/data/{key}")
    return np.frombuffer(data, dtype)[:numel]


def is_torchscript(path) -> bool:
  """Whether `path` is a TorchScript archive (a zip with `<name>/constants.pkl`)."""
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as z:
    return any(n.endswith("/constants.pkl") for n in z.namelist())


def read_archive(path) -> dict:
  """{attribute path: numpy array} of every tensor a TorchScript archive's modules hold."""
  with zipfile.ZipFile(path) as z:
    data = next(n for n in z.namelist() if n.endswith("/data.pkl") and n.count("/") == 1)
    prefix = data.rsplit("/", 1)[0]
    byteorder = f"{prefix}/byteorder"
    if byteorder in z.namelist() and z.read(byteorder).strip() != b"little":
      raise pickle.UnpicklingError("a big-endian archive; re-save it on a little-endian machine")
    root = _Unpickler(z, prefix).load()
  return _tensors(root)


def _tensors(obj, prefix=""):
  state = getattr(obj, "state", None)
  out = {}
  for key, value in state.items() if isinstance(state, dict) else ():
    if isinstance(value, np.ndarray):
      out[prefix + key] = value
    elif isinstance(value, ScriptObject):
      out.update(_tensors(value, f"{prefix}{key}."))
  return out
