"""transformers' DINOv3 ViT and SigLIP 2 NaFlex towers read by the hf format.

References: `transformers`' own DINOv3ViTModel (the plain MLP with q/v biases and storage
tokens, and the gated SiLU MLP without any bias), Siglip2VisionModel and Siglip2Model with
random weights, run in torch; SigLIP 2 on patches flattened by its image processor's own
`convert_image_to_patches`, every patch valid; torch's F.interpolate for the antialiased
bilinear resampling.

Tolerance: max |ours - ref| <= 1e-4 * max |ref|, every block, the final tokens (and SigLIP
2's attention-pooled embedding), at the checkpoint's grid and at another: DINOv3 recomputes
its RoPE coordinates for the image's grid, SigLIP 2 resizes its position table per image.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers.models.siglip2 import image_processing_pil_siglip2  # noqa: E402

from helpers import rel_err  # noqa: E402
from linearizer import convert, errors  # noqa: E402
from linearizer.models import common  # noqa: E402
from test_convert import images_at, perturb_  # noqa: E402

RTOL = 1e-4
WIDTH, DEPTH, HEADS, MLP = 64, 2, 2, 128
DINO_PATCH, DINO_SIZE, REGISTERS = 8, 32, 4  # a 4x4 grid
SIG_PATCH, SIG_GRID = 4, 4  # NaFlex's table: num_patches 16, a 4x4 grid
KINDS = ("dinov3", "dinov3_gated", "siglip2_vision", "siglip2")

forward = nnx.jit(lambda model, images: model(images))
pooled = nnx.jit(lambda model, images: model.pool(model(images)))


def build_hf(kind):
  shape = dict(
    hidden_size=WIDTH, intermediate_size=MLP, num_hidden_layers=DEPTH, num_attention_heads=HEADS
  )
  dino = dict(shape, patch_size=DINO_PATCH, image_size=DINO_SIZE)
  if kind == "dinov3":  # transformers' defaults: q and v biases, no k bias
    config = transformers.DINOv3ViTConfig(**dino, num_register_tokens=REGISTERS)
    return transformers.DINOv3ViTModel(config)
  if kind == "dinov3_gated":  # no bias anywhere, another RoPE temperature, no storage tokens
    config = transformers.DINOv3ViTConfig(
      **dino,
      use_gated_mlp=True,
      hidden_act="silu",
      query_bias=False,
      value_bias=False,
      proj_bias=False,
      mlp_bias=False,
      rope_theta=1000.0,
    )
    return transformers.DINOv3ViTModel(config)
  vision = transformers.Siglip2VisionConfig(
    **shape, patch_size=SIG_PATCH, num_patches=SIG_GRID * SIG_GRID
  )
  if kind == "siglip2_vision":
    return transformers.Siglip2VisionModel(vision)
  text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
  return transformers.Siglip2Model(
    transformers.Siglip2Config(vision_config=vision.to_dict(), text_config=text)
  )


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  """{kind: (torch model, saved transformers folder)}."""
  root = tmp_path_factory.mktemp("rope_teachers")
  out = {}
  for i, kind in enumerate(KINDS):
    hf = perturb_(build_hf(kind), seed=i)
    hf.save_pretrained(root / kind)
    out[kind] = hf, root / kind
  return out


def run_torch(hf, kind, images):
  """transformers' forward: DINOv3 on the images, SigLIP 2 on their patches."""
  pixels = images.transpose(0, 3, 1, 2)
  with torch.no_grad():
    if kind.startswith("dinov3"):
      return hf(pixel_values=torch.from_numpy(pixels), output_hidden_states=True)
    patches = np.stack(
      [image_processing_pil_siglip2.convert_image_to_patches(x, SIG_PATCH) for x in pixels]
    )
    grid = images.shape[1] // SIG_PATCH
    tower = hf.vision_model if kind == "siglip2" else hf
    return tower(
      pixel_values=torch.from_numpy(patches),
      pixel_attention_mask=torch.ones(patches.shape[:2], dtype=torch.int32),
      spatial_shapes=torch.tensor([[grid, grid]] * len(images)),
      output_hidden_states=True,
    )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("second", [False, True])
def test_matches_transformers(hf_dirs, kind, second):
  """Every block, the final tokens and SigLIP 2's pooled embedding at the checkpoint's grid
  (4x4) and at 6x6, both as loaded and with image_size = 6 x patch: DINOv3's RoPE follows
  the image's grid, SigLIP 2's table is resampled as transformers resizes it per image."""
  hf, folder = hf_dirs[kind]
  dino = kind.startswith("dinov3")
  size = (6 if second else 4) * (DINO_PATCH if dino else SIG_PATCH)
  models = [convert.load(folder, "hf")]
  if second:
    models.append(convert.load(folder, "hf", image_size=size))
  images = images_at(size, seed=size)
  ref = run_torch(hf, kind, images)
  for model in models:
    ours = forward(model, images)
    errs = [rel_err(b, ref.hidden_states[i + 1].numpy()) for i, b in enumerate(ours.blocks)]
    errs.append(rel_err(ours.tokens, ref.last_hidden_state.numpy()))
    if not dino:
      errs.append(rel_err(pooled(model, images), ref.pooler_output.numpy()))
    assert len(ours.blocks) == DEPTH and ours.logits is None
    assert max(errs) <= RTOL, errs
  if dino:  # HF's pooler_output is the final CLS
    assert rel_err(ours.cls[:, 0], ref.pooler_output.numpy()) <= RTOL


def has(cfg, **want):
  return {k: getattr(cfg, k) for k in want} == want


def test_what_each_source_is_loaded_as(hf_dirs):
  plain, gated, vision, siglip2 = (convert.load(hf_dirs[k][1], "hf").cfg for k in KINDS)
  assert has(plain, style="timm", rope="dinov3", rope_temperature=100.0, pos_embed=False)
  assert has(plain, registers=REGISTERS, qkv_bias=True, mlp="plain", layer_norm_eps=1e-5)
  assert has(plain, cls_token=True, pool="cls", layer_scale=1.0)
  assert plain.mean == (0.485, 0.456, 0.406) and plain.std == (0.229, 0.224, 0.225)
  assert has(gated, registers=0, qkv_bias=False, mlp="swiglu", rope_temperature=1000.0)
  assert has(vision, style="siglip", cls_token=False, pool="map", patch=SIG_PATCH)
  assert has(vision, image_size=SIG_GRID * SIG_PATCH, pos_interpolation="bilinear_antialias")
  assert vision.mean == vision.std == (0.5, 0.5, 0.5)
  assert siglip2 == vision  # the text tower beside it is not read
  # What the file determines cannot be overridden.
  with pytest.raises(errors.UserError, match="pos_embed=True"):
    convert.load(hf_dirs["dinov3"][1], "hf", pos_embed=True)
  with pytest.raises(errors.UserError, match="mlp='plain'"):
    convert.load(hf_dirs["dinov3_gated"][1], "hf", mlp="plain")


def test_preprocessor_config_gives_the_image_statistics(hf_dirs, tmp_path):
  mean, std = [0.1, 0.2, 0.3], [0.4, 0.5, 0.6]
  for kind in ("dinov3", "siglip2"):
    folder = tmp_path / kind
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
      (folder / name).write_bytes((hf_dirs[kind][1] / name).read_bytes())
    stats = dict(image_processor_type="X", image_mean=mean, image_std=std, do_normalize=True)
    (folder / "preprocessor_config.json").write_text(json.dumps(stats))
    cfg = convert.load(folder, "hf").cfg
    assert (cfg.mean, cfg.std) == (tuple(mean), tuple(std))


@pytest.mark.parametrize("n_in,n_out", [(4, 6), (6, 4), (16, 7), (3, 10)])
def test_bilinear_antialias_resampling_is_torchs(n_in, n_out):
  """`pos_interpolation='bilinear_antialias'` is transformers' SigLIP 2 resize:
  F.interpolate(mode='bilinear', align_corners=False, antialias=True), up and down."""
  grid = np.random.default_rng(n_in * n_out).standard_normal((1, 5, n_in, n_in))
  want = torch.nn.functional.interpolate(
    torch.from_numpy(grid), size=(n_out, n_out), mode="bilinear", antialias=True
  )[0].numpy()
  tokens = jnp.asarray(grid[0].reshape(5, -1).T[None], jnp.float32)
  got = common.resample_grid(tokens, (n_in, n_in), (n_out, n_out), bilinear=True)
  np.testing.assert_allclose(np.asarray(got[0]).T.reshape(5, n_out, n_out), want, atol=2e-6)


@pytest.mark.parametrize("kind", ["dinov3", "siglip2"])
def test_an_unknown_tensor_is_named(hf_dirs, kind, tmp_path):
  folder = hf_dirs[kind][1]
  state = load_file(folder / "model.safetensors")
  prefix = "vision_model." if kind == "siglip2" else ""
  state[prefix + "embeddings.extra_gain"] = torch.ones(WIDTH)
  save_file(state, tmp_path / "model.safetensors")
  (tmp_path / "config.json").write_text((folder / "config.json").read_text())
  with pytest.raises(convert.CheckpointMismatch, match=r"1 unexpected: .*embeddings\.extra_gain"):
    convert.load(tmp_path, "hf")


@pytest.mark.parametrize("kind", ["dinov3", "siglip2_vision"])
def test_a_bare_weights_file_loads_the_same_model(hf_dirs, kind, tmp_path):
  """Without config.json the tensor names tell the family, transformers' defaults the rest
  (heads excepted: width // 64)."""
  folder = hf_dirs[kind][1]
  bare = tmp_path / "model.safetensors"
  bare.write_bytes((folder / "model.safetensors").read_bytes())
  a, b = convert.load(bare, "hf", num_heads=HEADS), convert.load(folder, "hf")
  images = images_at(32 if kind == "dinov3" else 16)
  got, want = forward(a, images), forward(b, images)
  np.testing.assert_array_equal(got.tokens, want.tokens)


def test_dinov3_convnext_is_refused_by_what_it_is(tmp_path):
  config = transformers.DINOv3ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1])
  transformers.DINOv3ConvNextModel(config).save_pretrained(tmp_path / "convnext")
  with pytest.raises(errors.UserError, match="ConvNeXt.*not ViTs.*'dinov3_vit'.*supported"):
    convert.load(tmp_path / "convnext", "hf")


def test_a_siglip2_text_tower_is_refused_by_what_it_is(tmp_path):
  config = transformers.Siglip2TextConfig(
    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
  )
  transformers.Siglip2TextModel(config).save_pretrained(tmp_path / "text")
  with pytest.raises(errors.UserError, match="SigLIP 2 text tower.*Siglip2VisionModel.*supported"):
    convert.load(tmp_path / "text", "hf")


def test_a_radio_folder_is_refused_by_what_it_is(tmp_path):
  """NVlabs RADIO's HF folders (radio/hf_model.py, saved by hf_hub.py) hold a RADIOConfig,
  which names no model_type, and its weights under `radio_model.`."""
  config = {
    "architectures": ["RADIOModel"],
    "auto_map": {"AutoConfig": "hf_model.RADIOConfig", "AutoModel": "hf_model.RADIOModel"},
    "model_type": "",
    "version": "radio_v2.5-b",
    "patch_size": 16,
    "args": {"model": "vit_base_patch16_224", "teachers": [{"name": "dino_v2_g"}]},
  }
  tensors = {
    "radio_model.model.patch_generator.embedder.weight": torch.zeros(WIDTH, 3 * 16 * 16),
    "radio_model.model.blocks.0.attn.qkv.weight": torch.zeros(3 * WIDTH, WIDTH),
    "radio_model.input_conditioner.norm_mean": torch.zeros(3, 1, 1),
  }
  (tmp_path / "config.json").write_text(json.dumps(config))
  save_file(tensors, tmp_path / "model.safetensors")
  with pytest.raises(errors.UserError, match="RADIO.*not supported.*DINOv3 ViT"):
    convert.load(tmp_path, "hf")
  (tmp_path / "config.json").unlink()  # a bare weights file tells itself by its names
  with pytest.raises(errors.UserError, match="RADIO"):
    convert.load(tmp_path / "model.safetensors", "hf")
