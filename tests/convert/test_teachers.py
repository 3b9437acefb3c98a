"""The teachers people distil from today: DINOv2 (with and without registers) and SigLIP.

References: `transformers`' own Dinov2Model, Dinov2WithRegistersModel, SiglipVisionModel and
SiglipModel with random weights, run in torch; torch's F.interpolate for the antialiased
position-embedding resampling; tokens sliced by hand for the roles the losses read.

Tolerance: max |ours - ref| <= 1e-4 * max |ref|, every block, the final tokens and SigLIP's
pooled embedding, at the checkpoint's resolution and at another.
"""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from configs import common as cfg_common  # noqa: E402
from helpers import rel_err  # noqa: E402
from linearizer import convert, data, models, optim, train  # noqa: E402
from linearizer.distillation import distill, losses  # noqa: E402
from linearizer.errors import UserError  # noqa: E402
from linearizer.models import common  # noqa: E402
from test_convert import images_at, perturb_  # noqa: E402

RTOL = 1e-4
WIDTH, DEPTH, HEADS, PATCH, SIZE, REGISTERS = 64, 2, 4, 8, 32, 4
KINDS = ("dinov2", "dinov2_registers", "siglip_vision", "siglip")

forward = nnx.jit(lambda model, images: model(images))
pooled = nnx.jit(lambda model, images: model.pool(model(images)))


def build_hf(kind):
  shape = dict(
    hidden_size=WIDTH,
    num_hidden_layers=DEPTH,
    num_attention_heads=HEADS,
    image_size=SIZE,
    patch_size=PATCH,
  )
  if kind == "dinov2":
    return transformers.Dinov2Model(transformers.Dinov2Config(**shape, mlp_ratio=2))
  if kind == "dinov2_registers":
    config = transformers.Dinov2WithRegistersConfig(
      **shape, mlp_ratio=2, num_register_tokens=REGISTERS
    )
    return transformers.Dinov2WithRegistersModel(config)
  vision = transformers.SiglipVisionConfig(**shape, intermediate_size=2 * WIDTH)
  if kind == "siglip_vision":
    return transformers.SiglipVisionModel(vision)
  text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
  return transformers.SiglipModel(
    transformers.SiglipConfig(vision_config=vision.to_dict(), text_config=text)
  )


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  """{kind: (torch model, saved transformers folder)}."""
  root = tmp_path_factory.mktemp("teachers")
  out = {}
  for i, kind in enumerate(KINDS):
    hf = perturb_(build_hf(kind), seed=i)
    hf.save_pretrained(root / kind)
    out[kind] = hf, root / kind
  return out


def run_torch(hf, kind, images):
  pixels = torch.from_numpy(images.transpose(0, 3, 1, 2))
  tower = hf.vision_model if kind == "siglip" else hf
  extra = dict(interpolate_pos_encoding=True) if kind.startswith("siglip") else {}
  with torch.no_grad():
    return tower(pixel_values=pixels, output_hidden_states=True, **extra)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", [SIZE, 48])
def test_matches_transformers(hf_dirs, kind, size):
  """Every block, the final tokens (and SigLIP's attention-pooled embedding) at the
  checkpoint's 32² and, position embeddings resampled as each source does it, at 48²."""
  hf, folder = hf_dirs[kind]
  model = convert.load(folder, "hf")
  images = images_at(size, seed=size)
  ref = run_torch(hf, kind, images)
  ours = forward(model, images)
  assert len(ours.blocks) == DEPTH
  for i, block in enumerate(ours.blocks):
    assert rel_err(block, ref.hidden_states[i + 1].numpy()) <= RTOL, f"block {i}"
  assert rel_err(ours.tokens, ref.last_hidden_state.numpy()) <= RTOL
  assert ours.logits is None
  if kind.startswith("siglip"):
    assert rel_err(pooled(model, images), ref.pooler_output.numpy()) <= RTOL


def test_what_each_source_is_loaded_as(hf_dirs):
  config = {kind: convert.load(hf_dirs[kind][1], "hf").cfg for kind in KINDS}
  dino, reg, siglip = config["dinov2"], config["dinov2_registers"], config["siglip"]
  assert (dino.style, dino.registers, dino.cls_token, dino.pool) == ("timm", 0, True, "cls")
  assert dino.layer_scale is not None and dino.pos_interpolation == "bicubic"
  assert (reg.registers, reg.pos_interpolation) == (REGISTERS, "bicubic_antialias")
  assert (siglip.style, siglip.cls_token, siglip.pool) == ("siglip", False, "map")
  assert siglip.mean == siglip.std == (0.5, 0.5, 0.5)
  assert config["siglip_vision"] == siglip
  # What the tensors show cannot be overridden; how the embedding is resampled can.
  with pytest.raises(UserError, match="registers=0"):
    convert.load(hf_dirs["dinov2_registers"][1], "hf", registers=0)
  with pytest.raises(UserError, match="cls_token=True"):
    convert.load(hf_dirs["siglip"][1], "hf", cls_token=True)
  plain = convert.load(hf_dirs["dinov2_registers"][1], "hf", pos_interpolation="bicubic")
  assert plain.cfg.pos_interpolation == "bicubic"


def test_transformers_5_in_memory_names_load_too(hf_dirs, tmp_path):
  """transformers 5 saves DINOv2's Hub names (attention.attention.query, ...) but holds
  q_proj / k_proj / v_proj / o_proj in memory: a state dict saved as is loads the same."""
  hf, folder = hf_dirs["dinov2_registers"]
  state = {k: v.contiguous() for k, v in hf.state_dict().items()}
  assert "encoder.layer.0.attention.q_proj.weight" in state
  save_file(state, tmp_path / "model.safetensors")
  (tmp_path / "config.json").write_text((folder / "config.json").read_text())
  a, b = convert.load(tmp_path, "hf"), convert.load(folder, "hf")
  images = images_at(SIZE)
  for x, y in zip(jax.tree.leaves(nnx.state(a, nnx.Param)), jax.tree.leaves(nnx.state(b))):
    np.testing.assert_array_equal(x, y)
  np.testing.assert_array_equal(forward(a, images).tokens, forward(b, images).tokens)


@pytest.mark.parametrize("n_in,n_out", [(4, 7), (7, 4), (6, 6), (37, 16), (3, 10)])
def test_antialiased_resampling_is_torchs(n_in, n_out):
  """`pos_interpolation='bicubic_antialias'` is torch's F.interpolate(antialias=True), up
  and down (it differs from the plain rule at the borders even when upsampling)."""
  grid = np.random.default_rng(n_in * n_out).standard_normal((1, 5, n_in, n_in))
  want = torch.nn.functional.interpolate(
    torch.from_numpy(grid), size=(n_out, n_out), mode="bicubic", antialias=True
  )[0].numpy()
  tokens = jnp.asarray(grid[0].reshape(5, -1).T[None], jnp.float32)  # (1, h*w, 5)
  got = common.resample_grid(tokens, (n_in, n_in), (n_out, n_out), antialias=True)
  got = np.asarray(got[0]).T.reshape(5, n_out, n_out)
  np.testing.assert_allclose(got, want, atol=2e-6)


def test_dinov2_registers_appear_in_no_role_the_losses_read(hf_dirs):
  """Tokens are [cls, registers, patches]: CLS, patches and registers by hand."""
  model = convert.load(hf_dirs["dinov2_registers"][1], "hf")
  out = forward(model, images_at(SIZE))
  n = (SIZE // PATCH) ** 2
  assert out.tokens.shape[1] == 1 + REGISTERS + n
  cls, patches = losses.split_roles(out.blocks[0], out.roles)
  np.testing.assert_array_equal(cls, out.blocks[0][:, :1])
  np.testing.assert_array_equal(patches, out.blocks[0][:, 1 + REGISTERS :])
  assert out.roles.registers == (1, 1 + REGISTERS)
  np.testing.assert_array_equal(out.patches, out.tokens[:, 1 + REGISTERS :])


# ------------------------------------------------------- distilling from these teachers
STUDENT = dict(image_size=32, width=32, depth=2, headdim=16, d_state=16, chunk_size=16)


@pytest.mark.parametrize("kind,scope", [("dinov2_registers", "visible"), ("siglip", "all")])
def test_a_distill_step_reads_patches_and_cls_only(hf_dirs, kind, scope):
  """The step's AM loss, on a teacher with registers or without CLS, equals AM computed
  here on tokens sliced by hand: registers never enter, a CLS-less teacher matches patches
  only (mask 0, so 'visible' is every patch)."""
  teacher = convert.load(hf_dirs[kind][1], "hf")
  # As the distill stage builds it: reading images normalised as the teacher's.
  norm = dict(mean=teacher.cfg.mean, std=teacher.cfg.std)
  student = models.build("adventurer", "Ti/8", seed=0, **STUDENT, **norm)
  distiller = distill.Distiller(student, WIDTH, rngs=nnx.Rngs(1))
  loss = cfg_common.distill_loss(mask_ratio=0.0, w_mp=0.0, num_stages=DEPTH, scope=scope)
  config = distill_config(loss)
  tx = optim.make_optimizer(config.optim, 1)
  _, state = train.init_state(distiller, tx, ema=False)
  step = jax.jit(distill.make_distill_step(distiller, teacher, tx, config))
  x = jnp.asarray(images_at(SIZE))
  _, metrics = step(
    state, nnx.state(teacher, nnx.Param), data.Batch(x, jnp.zeros(2)), jax.random.key(0)
  )
  t_out, s_out = teacher(x), student(x)
  first = 1 + REGISTERS if kind == "dinov2_registers" else 0
  pairs = []
  for i in range(DEPTH):
    t_patch, s_patch = t_out.blocks[i][:, first:], s_out.blocks[i][:, :-1]
    if kind == "dinov2_registers":  # CLS first in the ViT, last in the student
      pairs.append(
        (
          jnp.concatenate([t_out.blocks[i][:, :1], t_patch], 1),
          jnp.concatenate([s_out.blocks[i][:, -1:], s_patch], 1),
        )
      )
    else:
      pairs.append((t_patch, s_patch))
  want = losses.activation_matching([t for t, _ in pairs], [s for _, s in pairs])[0]
  np.testing.assert_allclose(float(metrics["am"]), float(want), rtol=1e-5)


def distill_config(loss):
  return ml_collections.ConfigDict(
    dict(steps=1, optim=cfg_common.optim(lr=1e-3), loss=loss, teacher_input="resample")
  )


def test_cls_scope_is_refused_for_a_teacher_without_cls(hf_dirs):
  teacher = convert.load(hf_dirs["siglip"][1], "hf")
  with pytest.raises(UserError, match="scope='cls'.*has none"):
    distill.check_teacher(teacher, "cls")
  distill.check_teacher(teacher, "visible")  # the scopes that make sense pass


def test_unsupported_architectures_are_named(tmp_path):
  """A Swin, an EVA-02 or a SigLIP 2 text-tower folder is refused by what it is."""
  for model_type, phrase in [
    ("swin", "Swin"),
    ("eva02", "EVA-02"),
    ("siglip2_text_model", "SigLIP 2 text tower"),
    ("mystery", "CLIP, ViT, DINOv2"),
  ]:
    folder = tmp_path / model_type
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    save_file({"x": torch.zeros(1)}, folder / "model.safetensors")
    with pytest.raises(UserError, match=phrase):
      convert.load(folder, "hf")


# --------------------------------------------------- DINOv2's own release (torch hub .pth)
def hf_dinov2_to_hub(state: dict) -> dict:
  """transformers' Dinov2 (Hub names, as saved) -> facebookresearch/dinov2's state dict."""
  e = "embeddings."
  out = {
    "cls_token": state[e + "cls_token"],
    "pos_embed": state[e + "position_embeddings"],
    "mask_token": state[e + "mask_token"],
    "patch_embed.proj.weight": state[e + "patch_embeddings.projection.weight"],
    "patch_embed.proj.bias": state[e + "patch_embeddings.projection.bias"],
    "norm.weight": state["layernorm.weight"],
    "norm.bias": state["layernorm.bias"],
  }
  if e + "register_tokens" in state:
    out["register_tokens"] = state[e + "register_tokens"]
  for i in range(DEPTH):
    h, o = f"encoder.layer.{i}.", f"blocks.{i}."
    att = h + "attention.attention."
    for x in ("weight", "bias"):
      out[o + f"attn.qkv.{x}"] = torch.cat(
        [state[att + f"{n}.{x}"] for n in ("query", "key", "value")]
      )
      out[o + f"attn.proj.{x}"] = state[h + f"attention.output.dense.{x}"]
      for ours, theirs in [
        ("norm1", "norm1"),
        ("norm2", "norm2"),
        ("mlp.fc1", "mlp.fc1"),
        ("mlp.fc2", "mlp.fc2"),
      ]:
        out[o + f"{ours}.{x}"] = state[h + f"{theirs}.{x}"]
    out[o + "ls1.gamma"] = state[h + "layer_scale1.lambda1"]
    out[o + "ls2.gamma"] = state[h + "layer_scale2.lambda1"]
  return out


@pytest.mark.parametrize("kind", ["dinov2", "dinov2_registers"])
def test_dinov2_hub_pth_loads_the_same_model(hf_dirs, kind, tmp_path):
  """The hub layout of the same weights (and as a training checkpoint's `teacher` entry,
  `backbone.` prefixed, blocks chunked) loads to the transformers folder's model."""
  hf, folder = hf_dirs[kind]
  hub = hf_dinov2_to_hub(load_file(folder / "model.safetensors"))
  torch.save(hub, tmp_path / "hub.pth")
  chunked = {
    k.replace("blocks.1.", "blocks.1.1.").replace("blocks.0.", "blocks.0.0."): v
    for k, v in hub.items()
  }
  torch.save({"teacher": {"backbone." + k: v for k, v in chunked.items()}}, tmp_path / "train.pth")
  reference = convert.load(folder, "hf")
  images = images_at(SIZE)
  want = forward(reference, images)
  for name in ("hub.pth", "train.pth"):
    model = convert.load(tmp_path / name, "dinov2", num_heads=HEADS)
    assert model.cfg.registers == reference.cfg.registers
    assert model.cfg.pos_interpolation == (
      "bicubic_antialias" if kind == "dinov2_registers" else "bicubic_offset"
    )
    got = forward(model, images)
    for x, y in zip(got.blocks + (got.tokens,), want.blocks + (want.tokens,)):
      assert rel_err(x, y) <= 1e-6
  hub["blocks.0.attn.mystery"] = torch.zeros(3)  # an unmapped tensor is refused by name
  torch.save(hub, tmp_path / "extra.pth")
  with pytest.raises(convert.CheckpointMismatch, match="1 unexpected: blocks.0.attn.mystery"):
    convert.load(tmp_path / "extra.pth", "dinov2", num_heads=HEADS)


@pytest.mark.parametrize("n_in,n_out", [(4, 7), (4, 4 * 2), (37, 16), (3, 10)])
def test_offset_resampling_is_the_dinov2_hubs(n_in, n_out):
  """'bicubic_offset' is torch's bicubic at scale factor (n_out + 0.1) / n_in, as DINOv2's
  hub code asks for it."""
  grid = np.random.default_rng(n_in + n_out).standard_normal((1, 3, n_in, n_in))
  factor = (n_out + 0.1) / n_in
  want = torch.nn.functional.interpolate(
    torch.from_numpy(grid), scale_factor=(factor, factor), mode="bicubic"
  )[0].numpy()
  assert want.shape[-1] == n_out
  tokens = jnp.asarray(grid[0].reshape(3, -1).T[None], jnp.float32)
  got = common.resample_grid(tokens, (n_in, n_in), (n_out, n_out), offset=0.1)
  np.testing.assert_allclose(np.asarray(got[0]).T.reshape(3, n_out, n_out), want, atol=2e-6)


DINOV2_REPO = os.environ.get("LINEARIZER_DINOV2_REPO")  # a checkout of facebookresearch/dinov2


@pytest.mark.skipif(not DINOV2_REPO, reason="LINEARIZER_DINOV2_REPO names no dinov2 checkout")
@pytest.mark.parametrize("registers", [0, 4])
def test_dinov2s_own_code(registers, tmp_path, monkeypatch):
  """facebookresearch/dinov2's DinoVisionTransformer (as the hub builds it: LayerScale 1.0,
  offset 0.1 without registers, antialiasing with) against ours from its saved state dict:
  every block's patches, the final CLS and patches, at 32² and, resampled, at 48² and 56²."""
  monkeypatch.setenv("XFORMERS_DISABLED", "1")
  monkeypatch.syspath_prepend(DINOV2_REPO)
  from dinov2.models.vision_transformer import DinoVisionTransformer

  theirs = DinoVisionTransformer(
    img_size=SIZE,
    patch_size=PATCH,
    embed_dim=WIDTH,
    depth=DEPTH,
    num_heads=HEADS,
    mlp_ratio=2,
    init_values=1.0,
    num_register_tokens=registers,
    interpolate_antialias=bool(registers),
    interpolate_offset=0.0 if registers else 0.1,
  )
  perturb_(theirs)
  torch.save(theirs.state_dict(), tmp_path / "hub.pth")
  ours = convert.load(tmp_path / "hub.pth", "dinov2", num_heads=HEADS)
  for size in (SIZE, 48, 56):
    images = images_at(size, seed=size)
    pixels = torch.from_numpy(images.transpose(0, 3, 1, 2))
    with torch.no_grad():
      blocks = theirs.get_intermediate_layers(pixels, n=DEPTH, norm=False)
      final = theirs.forward_features(pixels)
    out = forward(ours, images)
    for i, (block, ref) in enumerate(zip(out.blocks, blocks)):
      assert rel_err(out.roles.patches_of(block), ref.numpy()) <= RTOL, f"block {i} @{size}"
    assert rel_err(out.patches, final["x_norm_patchtokens"].numpy()) <= RTOL
    assert rel_err(out.cls[:, 0], final["x_norm_clstoken"].numpy()) <= RTOL


# ---------------------------------------------- SigLIP's own release (big_vision .npz)
def hf_siglip_to_big_vision(state: dict, scanned: bool) -> dict:
  """transformers' SiglipModel (as saved) -> big_vision's SigLIP `.npz` (`params/img/...`,
  flax layouts, plus a stand-in text tower and the logit scale/bias)."""
  v, p, hd = "vision_model.", "params/img/", WIDTH // HEADS
  n = {k: t.numpy() for k, t in state.items()}
  heads = lambda w: w.T.reshape(WIDTH, HEADS, hd)  # torch (out, in) -> flax (in, heads, hd)
  out = {
    p + "embedding/kernel": n[v + "embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0),
    p + "embedding/bias": n[v + "embeddings.patch_embedding.bias"],
    p + "pos_embedding": n[v + "embeddings.position_embedding.weight"][None],
    p + "Transformer/encoder_norm/scale": n[v + "post_layernorm.weight"],
    p + "Transformer/encoder_norm/bias": n[v + "post_layernorm.bias"],
    "params/txt/Encoder_0/encoder_norm/scale": np.ones(8, np.float32),
    "params/t": np.zeros(1, np.float32),
    "params/b": np.zeros(1, np.float32),
  }

  def attention(prefix, q, k, v_, o, bias):
    for name, w, b in (("query", q, bias[0]), ("key", k, bias[1]), ("value", v_, bias[2])):
      out[prefix + f"{name}/kernel"] = heads(w)
      out[prefix + f"{name}/bias"] = b.reshape(HEADS, hd)
    out[prefix + "out/kernel"] = o[0].T.reshape(HEADS, hd, WIDTH)
    out[prefix + "out/bias"] = o[1]

  blocks = []
  for i in range(DEPTH):
    h, b = v + f"encoder.layers.{i}.", {}
    for ours, theirs in (("LayerNorm_0", "layer_norm1"), ("LayerNorm_1", "layer_norm2")):
      b[f"{ours}/scale"], b[f"{ours}/bias"] = n[h + theirs + ".weight"], n[h + theirs + ".bias"]
    for d in (0, 1):
      b[f"MlpBlock_0/Dense_{d}/kernel"] = n[h + f"mlp.fc{d + 1}.weight"].T
      b[f"MlpBlock_0/Dense_{d}/bias"] = n[h + f"mlp.fc{d + 1}.bias"]
    before = set(out)
    a = h + "self_attn."
    attention(
      "ATT/",
      *(n[a + f"{x}_proj.weight"] for x in "qkv"),
      (n[a + "out_proj.weight"], n[a + "out_proj.bias"]),
      [n[a + f"{x}_proj.bias"] for x in "qkv"],
    )
    b.update({"MultiHeadDotProductAttention_0/" + k[4:]: out.pop(k) for k in set(out) - before})
    blocks.append(b)
  if scanned:
    for k in blocks[0]:
      out[p + f"Transformer/encoderblock/{k}"] = np.stack([b[k] for b in blocks])
  else:
    for i, b in enumerate(blocks):
      out.update({p + f"Transformer/encoderblock_{i}/{k}": x for k, x in b.items()})
  m, hh = p + "MAPHead_0/", v + "head."
  w, bias = n[hh + "attention.in_proj_weight"], n[hh + "attention.in_proj_bias"]
  attention(
    m + "MultiHeadDotProductAttention_0/",
    *np.split(w, 3),
    (n[hh + "attention.out_proj.weight"], n[hh + "attention.out_proj.bias"]),
    np.split(bias, 3),
  )
  out[m + "probe"] = n[hh + "probe"]
  out[m + "LayerNorm_0/scale"], out[m + "LayerNorm_0/bias"] = (
    n[hh + "layernorm.weight"],
    n[hh + "layernorm.bias"],
  )
  for d in (0, 1):
    out[m + f"MlpBlock_0/Dense_{d}/kernel"] = n[hh + f"mlp.fc{d + 1}.weight"].T
    out[m + f"MlpBlock_0/Dense_{d}/bias"] = n[hh + f"mlp.fc{d + 1}.bias"]
  return out


@pytest.mark.parametrize("scanned", [False, True])
def test_siglip_big_vision_npz_loads_the_same_model(hf_dirs, scanned, tmp_path):
  """big_vision's layout of the same SigLIP weights (the text tower beside it ignored)
  loads to the transformers folder's model: blocks, tokens and the pooled embedding."""
  hf, folder = hf_dirs["siglip"]
  np.savez(
    tmp_path / "siglip.npz",
    **hf_siglip_to_big_vision(load_file(folder / "model.safetensors"), scanned),
  )
  model = convert.load(tmp_path / "siglip.npz", "big_vision")
  reference = convert.load(folder, "hf")
  assert model.cfg == reference.cfg  # style siglip, no CLS, pool map, tanh GELU
  images = images_at(SIZE)
  got, want = forward(model, images), forward(reference, images)
  for x, y in zip(got.blocks + (got.tokens,), want.blocks + (want.tokens,)):
    assert rel_err(x, y) <= 1e-6
  assert rel_err(pooled(model, images), pooled(reference, images)) <= 1e-6
