"""linearizer.cpu_malloc: when main.py re-executes under the glibc tunables, and that they
stop XLA:CPU's per-step scratch memory from being faulted in afresh every step."""

import importlib.metadata
import importlib.util
import os
import platform
import resource
import subprocess
import sys

import pytest

from helpers import ROOT
from linearizer import cpu_malloc

glibc_linux = pytest.mark.skipif(
  sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc tunables"
)


@glibc_linux
def test_environment_adds_the_tunables_only_for_a_cpu_run_that_set_none():
  env = cpu_malloc.environment({"JAX_PLATFORMS": "cpu", "HOME": "/h"})
  assert env == {"JAX_PLATFORMS": "cpu", "HOME": "/h", "GLIBC_TUNABLES": cpu_malloc.TUNABLES}
  assert cpu_malloc.environment({"JAX_PLATFORMS": "cpu,cuda"}) is not None  # CPU first
  assert cpu_malloc.environment({"JAX_PLATFORMS": "cuda"}) is None
  assert cpu_malloc.environment({"JAX_PLATFORMS": "tpu,cpu"}) is None
  # Set by the user, even to nothing: theirs to keep (and no second re-exec).
  assert cpu_malloc.environment({"JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": ""}) is None


@glibc_linux
def test_without_jax_platforms_an_installed_accelerator_plugin_means_not_cpu(monkeypatch):
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # no libtpu
  monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: ())
  assert cpu_malloc.environment({})["GLIBC_TUNABLES"] == cpu_malloc.TUNABLES
  monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: ("xla_cuda12",))
  assert cpu_malloc.environment({}) is None
  assert cpu_malloc.environment({"JAX_PLATFORMS": "cpu"}) is not None  # cpu asked for
  monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: ())
  for installed in ("libtpu", "jax_plugins"):  # a TPU, or a plugin in JAX's namespace package
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, i=installed: name == i or None)
    assert cpu_malloc.environment({}) is None, installed


REEXEC = """
import os, sys
sys.path.insert(0, {root!r})
from linearizer import cpu_malloc
print(os.getpid(), os.environ.get("GLIBC_TUNABLES"), sys.argv[1:], flush=True)
cpu_malloc.reexec()
"""


@glibc_linux
def test_reexec_runs_the_same_script_once_more_under_the_tunables(tmp_path):
  script = tmp_path / "script.py"
  script.write_text(REEXEC.format(root=str(ROOT)))
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  env["JAX_PLATFORMS"] = "cpu"
  out = subprocess.run(
    [sys.executable, "-u", str(script), "a", "--b=1"],
    env=env,
    capture_output=True,
    text=True,
    timeout=60,
    check=True,
  )
  first, second = out.stdout.splitlines()  # once more, not twice
  assert first.split(" ", 1)[0] == second.split(" ", 1)[0]  # the same process
  assert first.endswith(" None ['a', '--b=1']")
  assert second.endswith(f" {cpu_malloc.TUNABLES} ['a', '--b=1']")
  # From stdin the script cannot be read again: it runs once, untouched.
  out = subprocess.run(
    [sys.executable, "-", "a"],
    input=REEXEC.format(root=str(ROOT)),
    env=env,
    capture_output=True,
    text=True,
    timeout=60,
    check=True,
  )
  assert len(out.stdout.splitlines()) == 1
  # main.py does it first thing.
  assert "cpu_malloc.reexec()" in (ROOT / "main.py").read_text()


def test_environment_is_none_off_glibc(monkeypatch):
  monkeypatch.setattr(platform, "libc_ver", lambda: ("musl", "1.2"))
  assert cpu_malloc.environment({"JAX_PLATFORMS": "cpu"}) is None


# A jitted step whose XLA scratch buffer (~100 MB) is far above glibc's mmap threshold.
STEP = """
import resource, jax, jax.numpy as jnp
x = jnp.ones((2048, 2048))
f = jax.jit(lambda x: (jnp.tanh(x @ x) @ jnp.sin(x @ x.T) + jnp.exp(-x @ x)).sum())
f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
  f(x).block_until_ready()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 5)
"""


def page_faults_per_step(tunables):
  env = dict(os.environ, JAX_PLATFORMS="cpu", GLIBC_TUNABLES=tunables)
  proc = subprocess.run(
    [sys.executable, "-c", STEP], env=env, capture_output=True, text=True, timeout=300, check=True
  )
  return int(proc.stdout.split()[-1])


def transparent_huge_pages_always():
  path = "/sys/kernel/mm/transparent_hugepage/enabled"
  return os.path.exists(path) and "[always]" in open(path).read()


@glibc_linux
@pytest.mark.skipif(
  resource.getpagesize() != 4096 or transparent_huge_pages_always(),
  reason="the fault counts below are for 4 KiB pages",
)
def test_tunables_stop_the_scratch_memory_being_faulted_in_every_step():
  default, tuned = page_faults_per_step(""), page_faults_per_step(cpu_malloc.TUNABLES)
  assert default > 10_000, default  # each step maps ~100 MB of scratch afresh: 4 KiB pages
  assert tuned < default / 10, (tuned, default)
