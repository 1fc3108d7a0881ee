"""UNet2DConditionModel against diffusers' PyTorch model on tiny random configs of each family,
the naming contract with diffusers' state dict, the parallel-context call sites, input checks
and `UNetConfig`."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.traverse_util import unflatten_dict

from convert.keymap import convert_state_dict
from models.config import UNetConfig
from models.presets import unet_preset
from models.unet import UNet2DConditionModel
from models.parallel import ParallelContext

HEIGHT, WIDTH, TOKENS = 16, 24, 5  # latent height != width on purpose
TOLERANCE = 1e-4  # max|ours − diffusers| / max|diffusers|, fp32

CONFIGS = {
    # SD1.x: 4 levels, 3 cross-attention levels + a plain one, 1×1-conv proj_in, int head count.
    "sd15": dict(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 attention_head_dim=2, cross_attention_dim=24),
    # SD2.x: linear projections, per-level head counts, upcast attention.
    "sd21": dict(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 attention_head_dim=(1, 2, 4), use_linear_projection=True, upcast_attention=True,
                 cross_attention_dim=24),
    # SDXL: plain first level, deeper transformers lower down, text_time micro-conditioning.
    "sdxl": dict(block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=8,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 attention_head_dim=(1, 2, 4), transformer_layers_per_block=(1, 1, 2),
                 use_linear_projection=True, cross_attention_dim=32,
                 addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=16 + 6 * 8),
    # Class-conditional, with the rarer options: concatenated class embedding, per-layer
    # transformer depths, centred input, cos/sin order and frequency shift, mid-block scale,
    # time-embedding width, 5×5 conv_in and 1×1 conv_out.
    "class": dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                  attention_head_dim=2, cross_attention_dim=16, num_class_embeds=10,
                  class_embeddings_concat=True, transformer_layers_per_block=[[2], 1],
                  reverse_transformer_layers_per_block=[[1, 1], [1, 2]],
                  center_input_sample=True, flip_sin_to_cos=False, freq_shift=1,
                  mid_block_scale_factor=1.5, time_embedding_dim=48, conv_in_kernel=5,
                  conv_out_kernel=1),
    # One level (no down/upsampling) keeps these two cheap: they differ only in the class embedding.
    "class_timestep": dict(block_out_channels=(16,), layers_per_block=1, norm_num_groups=8,
                           down_block_types=("CrossAttnDownBlock2D",),
                           up_block_types=("CrossAttnUpBlock2D",), attention_head_dim=2,
                           cross_attention_dim=16, class_embed_type="timestep"),
    "class_projection": dict(block_out_channels=(16,), layers_per_block=1, norm_num_groups=8,
                             down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",),
                             attention_head_dim=2, cross_attention_dim=16,
                             class_embed_type="projection", projection_class_embeddings_input_dim=12),
}


# ---------------------------------------------------------------------------------- helpers

@functools.cache
def built(name: str):
  """(diffusers model with perturbed weights, our model loaded from its state dict)."""
  import torch
  from diffusers import UNet2DConditionModel as TorchUNet

  torch.manual_seed(0)
  reference = TorchUNet(**CONFIGS[name]).eval()
  with torch.no_grad():  # perturb every weight: zero-initialised biases and ones-scales included
    for p in reference.parameters():
      p.add_(0.05 * torch.randn_like(p))
  state = {k: v.numpy() for k, v in reference.state_dict().items()}
  config = UNetConfig.from_diffusers_config(dict(reference.config))
  return reference, load(config, state)


def load(config: UNetConfig, state: dict, **kwargs) -> UNet2DConditionModel:
  """Our UNet with its params taken from a diffusers state dict (convert/keymap.py, strict)."""
  model = nnx.eval_shape(lambda: UNet2DConditionModel(config, rngs=nnx.Rngs(0), **kwargs))
  graphdef, params = nnx.split(model, nnx.Param)
  shapes = {path: tuple(v.shape) for path, v in nnx.to_flat_state(params)}
  converted = convert_state_dict(state, shapes)
  nnx.replace_by_pure_dict(params, unflatten_dict({p: jnp.asarray(a) for p, a in converted.items()}))
  return nnx.merge(graphdef, params)


@functools.cache
def jitted(name: str):
  """Our model's forward, jitted once per config (compiled once per input shapes and dtypes).

  XLA's backend optimisation level 0 halves CPU compile time; the maths is unchanged.
  """
  graphdef, params = nnx.split(built(name)[1])
  forward = jax.jit(lambda params, *args, **kw: nnx.merge(graphdef, params)(*args, **kw),
                    compiler_options={"xla_backend_optimization_level": 0})
  return functools.partial(forward, params)


def inputs(name: str, batch: int, seed: int = 0) -> dict:
  """Random NHWC inputs for config `name` (numpy), keyed by our argument names."""
  rng = np.random.default_rng(seed)
  cfg = CONFIGS[name]
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)  # noqa: E731
  out = dict(x=normal(batch, HEIGHT, WIDTH, 4),
             encoder_hidden_states=normal(batch, TOKENS, cfg["cross_attention_dim"]))
  if cfg.get("addition_embed_type") == "text_time":
    out["text_embeds"] = normal(batch, 16)
    out["time_ids"] = rng.choice([0.0, 16.0, 128.0, 1024.0], size=(batch, 6)).astype(np.float32)
  if cfg.get("num_class_embeds"):
    out["class_labels"] = rng.integers(0, cfg["num_class_embeds"], size=(batch,))
  elif cfg.get("class_embed_type") == "timestep":
    out["class_labels"] = rng.uniform(0, 1000, size=(batch,)).astype(np.float32)
  elif cfg.get("class_embed_type") == "projection":
    out["class_labels"] = normal(batch, cfg["projection_class_embeddings_input_dim"])
  return out


def run_diffusers(reference, args: dict, timesteps) -> np.ndarray:
  import torch

  t = lambda a: torch.from_numpy(np.asarray(a))  # noqa: E731
  added = ({"text_embeds": t(args["text_embeds"]), "time_ids": t(args["time_ids"])}
           if "text_embeds" in args else None)
  with torch.no_grad():
    out = reference(t(args["x"]).permute(0, 3, 1, 2),
                    t(timesteps) if isinstance(timesteps, np.ndarray) else timesteps,
                    t(args["encoder_hidden_states"]),
                    class_labels=t(args["class_labels"]) if "class_labels" in args else None,
                    added_cond_kwargs=added).sample
  return out.permute(0, 2, 3, 1).numpy()


def relative_error(ours, theirs) -> float:
  return float(np.max(np.abs(np.asarray(ours) - theirs)) / np.max(np.abs(theirs)))


# ---------------------------------------------------------------------------------- parity

BATCH2 = [np.array([1, 999]), np.array([500.0, 37.5], np.float32)]  # (B,) int and float
BATCH1 = [999, 37.5]  # scalars


@pytest.mark.parametrize("name,batch", [("sd15", 2), ("sd21", 1), ("sdxl", 2), ("class", 2),
                                        ("class_timestep", 1), ("class_projection", 2)])
def test_matches_diffusers(name, batch):
  reference, _ = built(name)
  forward = jitted(name)
  args = inputs(name, batch)
  for timesteps in (BATCH2 if batch == 2 else BATCH1):
    # One compile per batch size: int and float timesteps both reach the model as float32 (it
    # casts them itself; ints go through the model in test_row_patches_need_nothing_but_the_context).
    ours = forward(args["x"], np.asarray(timesteps, np.float32), args["encoder_hidden_states"],
                   **{k: v for k, v in args.items() if k not in ("x", "encoder_hidden_states")})
    theirs = run_diffusers(reference, args, timesteps)
    assert ours.shape == theirs.shape == (batch, HEIGHT, WIDTH, 4)
    error = relative_error(ours, theirs)
    assert error <= TOLERANCE, f"{name} batch {batch} t={timesteps}: relative error {error:.2e}"


@pytest.mark.parametrize("name", ["sd15", "sdxl", "class"])
def test_every_param_comes_from_exactly_one_diffusers_tensor(name):
  reference, model = built(name)
  params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  shapes = {path: tuple(v.shape) for path, v in params.items()}
  state = {k: v.numpy() for k, v in reference.state_dict().items()}
  converted = convert_state_dict(state, shapes)  # raises on unknown, missing, duplicate, shape
  assert set(converted) == set(shapes) and len(state) == len(shapes)
  assert nnx.state(model, nnx.Not(nnx.Param)) == nnx.State({})  # nothing but converted params


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_ctx_keys_are_diffusers_module_paths(name):
  import torch
  from diffusers.models.attention_processor import Attention

  reference, model = built(name)
  torch_modules = dict(reference.named_modules())
  kinds = {"Conv2d": torch.nn.Conv2d, "GroupNorm": torch.nn.GroupNorm, "Attention": Attention,
           "Linear": torch.nn.Linear}
  renamed = {"to_out": "to_out.0", "ff.proj_in": "ff.net.0.proj", "ff.proj_out": "ff.net.2"}  # models/attention.py
  keys = [(type(m).__name__, m.ctx_key) for _, m in nnx.iter_graph(model)
          if isinstance(m, nnx.Module) and hasattr(m, "ctx_key")]
  assert len({k for _, k in keys}) == len(keys)
  for kind, key in keys:
    torch_key = next((key.removesuffix(ours) + theirs for ours, theirs in renamed.items() if key.endswith(ours)), key)
    assert isinstance(torch_modules.get(torch_key), kinds[kind]), (kind, key)
  attn1 = [k for kind, k in keys if k.endswith("attn1")]
  assert attn1 and all(kind == "Attention" for kind, k in keys if k.endswith(("attn1", "attn2")))


class Recorder(ParallelContext):
  """Full image: records each layer's whole-image halo input, K/V and moments."""

  def __init__(self):
    self.seen = {}

  def _record(self, key, value):
    assert key not in self.seen, f"layer key {key} used twice"
    self.seen[key] = value
    return value

  def conv_halo(self, x_bhwc, rows, key):
    padded, _ = super().conv_halo(x_bhwc, rows, key)
    return self._record(key, padded), None

  def attend(self, q_btnd, k_btnd, v_btnd, key):
    self._record(key, (k_btnd, v_btnd))
    return super().attend(q_btnd, k_btnd, v_btnd, key)

  def norm_moments(self, moments_bg2, key):
    return self._record(key, moments_bg2), None


class Replay(ParallelContext):
  """Row patch `index` of `count`: every cross-row request answered from the full-image run."""

  def __init__(self, seen, index, count):
    self.seen, self.index, self.count = seen, index, count

  def conv_halo(self, x_bhwc, rows, key):
    h = x_bhwc.shape[1]
    return self.seen[key][:, self.index * h:self.index * h + h + 2 * rows], None

  def attend(self, q_btnd, k_btnd, v_btnd, key):
    k_full, v_full = self.seen[key]
    return jax.nn.dot_product_attention(q_btnd, k_full, v_full), None

  def norm_moments(self, moments_bg2, key):
    return self.seen[key], None


def test_row_patches_need_nothing_but_the_context():
  """Patches answered from the full-image run stitch back into the full output: every cross-row
  dependency of the model goes through the context, under unique keys."""
  _, model = built("class")
  graphdef, params = nnx.split(model)
  args = inputs("class", 1)
  count = 2

  @functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
  def full_and_stitched(params, x, context, labels):
    unet = nnx.merge(graphdef, params)
    recorder = Recorder()
    full = unet(x, 10, context, class_labels=labels, ctx=recorder)
    rows = x.shape[1] // count
    stitched = jnp.concatenate([
        unet(x[:, i * rows:(i + 1) * rows], 10, context, class_labels=labels,
             ctx=Replay(recorder.seen, i, count)) for i in range(count)], axis=1)
    return full, stitched

  full, stitched = full_and_stitched(params, args["x"], args["encoder_hidden_states"],
                                     args["class_labels"])
  assert relative_error(stitched, np.asarray(full)) <= 1e-5


@pytest.mark.slow
def test_bfloat16_runs_close_to_float32():
  reference, _ = built("sdxl")
  state = {k: v.numpy() for k, v in reference.state_dict().items()}
  model = load(UNetConfig.from_diffusers_config(dict(reference.config)), state,
               dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  args = inputs("sdxl", 2)
  graphdef, params = nnx.split(model)
  out = jax.jit(lambda p, a: nnx.merge(graphdef, p)(
      a["x"], 500, a["encoder_hidden_states"], text_embeds=a["text_embeds"],
      time_ids=a["time_ids"]))(params, args)
  assert out.dtype == jnp.bfloat16
  assert relative_error(out.astype(jnp.float32), run_diffusers(reference, args, 500)) <= 5e-2


# ---------------------------------------------------------------------------------- input checks

def call(name, **changes):
  args = {**inputs(name, 2), **changes}
  x, context = args.pop("x"), args.pop("encoder_hidden_states")
  return built(name)[1](x, args.pop("timesteps", 1), context, **args)


@pytest.mark.parametrize("name,changes,match", [
    ("sd15", dict(x=np.zeros((16, 24, 4))), r"rank 4, got shape \(16, 24, 4\)"),
    ("sd15", dict(x=np.zeros((2, 4, 16, 24))), r"24 channels.*in_channels=4.*NCHW"),
    ("sd15", dict(x=np.zeros((2, 20, 24, 4))), r"height 20 is not divisible by 8; nearest valid heights: \[16, 24\]"),
    ("sd15", dict(x=np.zeros((2, 16, 30, 4))), r"width 30 is not divisible by 8; nearest valid widths: \[32, 24\]"),
    ("sd15", dict(encoder_hidden_states=None), r"encoder_hidden_states is required: \(B, S, 24\)"),
    ("sd15", dict(encoder_hidden_states=np.zeros((2, 24))), r"must have shape \(B, S, 24\).*got \(2, 24\)"),
    ("sd15", dict(encoder_hidden_states=np.zeros((2, 5, 32))), r"must have shape \(B, S, 24\)"),
    ("sd15", dict(encoder_hidden_states=np.zeros((1, 5, 24))), r"batch sizes disagree: x has batch 2 but \{'encoder_hidden_states': 1\}"),
    ("sd15", dict(timesteps=np.zeros(3)), r"timesteps must be a scalar or have shape \(2,\)"),
    ("sdxl", dict(text_embeds=None), r"needs text_embeds"),
    ("sdxl", dict(time_ids=None), r"needs time_ids"),
    ("sdxl", dict(text_embeds=np.zeros((2, 20))), r"20 \+ 6×8 = 68.*projection_class_embeddings_input_dim=64.*needs last dim 16"),
    ("sdxl", dict(time_ids=np.zeros((1, 6))), r"batch sizes disagree.*'time_ids': 1"),
    ("class", dict(class_labels=None), r"class-conditional .*pass class_labels"),
    ("class_projection", dict(class_labels=np.zeros((2, 5))), r"class_labels must have shape \(B, 12\)"),
])
def test_bad_inputs_raise_with_the_fix(name, changes, match):
  with pytest.raises(ValueError, match=match):
    call(name, **changes)


# ---------------------------------------------------------------------------------- config

def test_config_from_published_configs():
  sd15 = UNetConfig.from_diffusers_config({**unet_preset("sd15"), "_class_name": "UNet2DConditionModel",
                                           "_diffusers_version": "0.6.0", "dropout": 0.0})
  assert sd15.num_attention_heads == (8, 8, 8, 8)  # diffusers' attention_head_dim quirk
  assert (sd15.num_levels, sd15.downsample_factor, sd15.time_embed_dim) == (4, 8, 1280)
  sd21 = UNetConfig.from_diffusers_config(unet_preset("sd21"))
  assert sd21.num_attention_heads == (5, 10, 20, 20) and sd21.upcast_attention
  sdxl = UNetConfig.from_diffusers_config(unet_preset("sdxl"))
  assert sdxl.down_transformer_layers(2) == (10, 10) and sdxl.up_transformer_layers(0) == (10,) * 3
  assert sdxl.mid_transformer_layers == 10 and sdxl.downsample_factor == 4
  explicit = UNetConfig.from_diffusers_config({**unet_preset("sd15"), "num_attention_heads": 4})
  assert explicit.num_attention_heads == (4,) * 4
  assert hash(sdxl) == hash(UNetConfig.from_diffusers_config(unet_preset("sdxl")))


@pytest.mark.parametrize("changes,match", [
    (dict(only_cross_attention=True), r"only_cross_attention=True is not supported.*supported values: False"),
    (dict(only_cross_attention=[False, True, False, False]), r"only_cross_attention"),
    (dict(resnet_time_scale_shift="scale_shift"), r"resnet_time_scale_shift='scale_shift'.*supported values: 'default'"),
    (dict(mid_block_type=None), r"mid_block_type=None.*'UNetMidBlock2DCrossAttn'"),
    (dict(time_embedding_type="fourier"), r"time_embedding_type='fourier'"),
    (dict(dual_cross_attention=True), r"dual_cross_attention=True"),
    (dict(encoder_hid_dim=768), r"encoder_hid_dim=768"),
    (dict(down_block_types=["AttnDownBlock2D"] + ["CrossAttnDownBlock2D"] * 3), r"down_block_types\[0\]='AttnDownBlock2D'"),
    (dict(class_embed_type="identity"), r"class_embed_type='identity'.*'timestep', 'projection'"),
    (dict(addition_embed_type="text"), r"addition_embed_type='text'.*'text_time'"),
    (dict(upsample_type="conv"), r"unknown UNet config keys \['upsample_type'\]"),
    (dict(block_out_channels=[320, 640, 1280]), r"block_out_channels has 3 entries but down_block_types has 4"),
    (dict(attention_head_dim=[8, 8]), r"num_attention_heads has 2 entries"),
    (dict(norm_num_groups=48), r"\[320, 640, 1280, 1280\] not divisible by norm_num_groups=48"),
    (dict(norm_num_groups=None), r"norm_num_groups=None"),
    (dict(conv_in_kernel=4), r"conv_in_kernel=4"),
    (dict(attention_head_dim=400), r"num_attention_heads\[0\]=400"),
    (dict(cross_attention_dim=[768, 1024, 768, 768]), r"cross_attention_dim .*disagree"),
    (dict(class_embed_type="projection"), r"projection_class_embeddings_input_dim"),
    (dict(num_class_embeds=None, class_embeddings_concat=True), r"class_embeddings_concat=True needs a class embedding"),
    (dict(addition_embed_type="text_time"), r"addition_time_embed_dim and projection_class_embeddings_input_dim"),
    (dict(transformer_layers_per_block=[[1, 1], 1, 1, 1]), r"set reverse_transformer_layers_per_block"),
    (dict(transformer_layers_per_block=[[1, 1, 1], 1, 1, 1], reverse_transformer_layers_per_block=[1] * 4),
     r"transformer_layers_per_block\[0\]=\(1, 1, 1\) gives 3 depths for a block of 2 layers"),
])
def test_unsupported_or_inconsistent_config_raises(changes, match):
  with pytest.raises(ValueError, match=match):
    UNetConfig.from_diffusers_config({**unet_preset("sd15"), **changes})


def test_check_latent_size_names_the_nearest_valid_sizes():
  sd15 = UNetConfig.from_diffusers_config(unet_preset("sd15"))
  sd15.check_latent_size(64, 96)
  sd15.check_latent_size(96, 64, row_splits=4)
  with pytest.raises(ValueError, match=r"height 60 is not divisible by 8; nearest valid heights: \[56, 64\]"):
    sd15.check_latent_size(60, 64)
  with pytest.raises(ValueError, match=r"height 80 over 4 row patches is not divisible by 4 × 8 = 32; "
                                       r"nearest valid heights: \[64, 96\]"):
    sd15.check_latent_size(80, 64, row_splits=4)
  with pytest.raises(ValueError, match=r"height 4 .*\[8\].*width 3 .*\[8\]"):
    sd15.check_latent_size(4, 3)
  with pytest.raises(ValueError, match="row_splits must be a positive int"):
    sd15.check_latent_size(64, 64, row_splits=0)
