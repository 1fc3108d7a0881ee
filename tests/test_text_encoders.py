"""CLIP and T5 text encoders against transformers' own models (torch, fp32) on tiny random configs.

Each torch model is saved with `save_pretrained` (safetensors), read back with convert/safetensors_io.py,
mapped by its keymap (strict) into the dfjax model, and run jitted on padded batches with and without an
attention mask: every hidden state, the pooled output and the projection must match to 1e-4 relative.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from convert.clip_keymap import POSITION_IDS, convert_clip_state_dict
from convert.safetensors_io import read_safetensors
from convert.t5_keymap import SHARED, TIED, convert_t5_state_dict
from models.clip import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from models.layers import PARAM_AXES
from models.t5 import T5Config, T5EncoderModel, relative_position_buckets
from models.text_encoder import GENERIC_CONFIG_KEYS, JittedEncoder

VOCAB = 99
EOT = VOCAB - 1  # the end-of-text token: the largest id, as CLIP's <|endoftext|> (49407) is
TINY_CLIP = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, projection_dim=24, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=16, bos_token_id=VOCAB - 2, eos_token_id=EOT)
CLIPS = {
    # SD1.x's encoder: quick_gelu, pooled at the first end-of-text id, padded with that same id
    "quick_gelu": (transformers.CLIPTextModel, dict(hidden_act="quick_gelu", eos_token_id=EOT, pad_token_id=EOT)),
    # SDXL's second encoder: gelu, projection, an old config with eos_token_id 2 (pooled at argmax), pad id 0
    "gelu_argmax": (transformers.CLIPTextModelWithProjection, dict(hidden_act="gelu", eos_token_id=2, pad_token_id=0)),
}
TINY_T5 = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
               relative_attention_num_buckets=8, relative_attention_max_distance=12)
T5S = {"gated-gelu": dict(feed_forward_proj="gated-gelu"), "relu": dict(feed_forward_proj="relu")}
TOKENS = 14  # long enough to reach the T5 configs' logarithmic buckets and beyond max_distance


def perturbed(module: torch.nn.Module) -> torch.nn.Module:
  """Every param moved by noise (ones and zeros of the norms too), in eval mode."""
  torch.manual_seed(0)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(0.2 * torch.randn_like(p))
  return module.eval()


def param_shapes(model: nnx.Module) -> dict:
  return {p: tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def load_converted(model_class, config, params: dict) -> nnx.Module:
  """The dfjax model of `config` with `params` (target path → array), built without a random init."""
  abstract = nnx.eval_shape(lambda: model_class(config, rngs=nnx.Rngs(0)))
  graphdef, state, rest = nnx.split(abstract, nnx.Param, ...)
  flat = nnx.to_flat_state(state)
  for path, variable in flat:
    variable.set_value(jnp.asarray(params[path]))
  return nnx.merge(graphdef, nnx.from_flat_state(flat), rest)


@functools.cache
def saved(kind: str, name: str, tmp_root: str):
  """(torch model, its folder written by save_pretrained) for CLIPS[name] or T5S[name]."""
  if kind == "clip":
    torch_class, extra = CLIPS[name]
    torch_model = perturbed(torch_class(transformers.CLIPTextConfig(**{**TINY_CLIP, **extra})))
  else:
    torch_model = perturbed(transformers.T5EncoderModel(transformers.T5Config(**TINY_T5, **T5S[name])))
  folder = f"{tmp_root}/{kind}-{name}"
  torch_model.save_pretrained(folder, safe_serialization=True)
  return torch_model, folder


@functools.cache
def converted(kind: str, name: str, tmp_root: str):
  """(torch model, the dfjax model read from its saved folder through the keymap, its jitted encoder)."""
  torch_model, folder = saved(kind, name, tmp_root)
  config_dict = json.loads(open(f"{folder}/config.json").read())
  tensors = read_safetensors(f"{folder}/model.safetensors")
  if kind == "clip":
    config = CLIPTextConfig.from_transformers_config(config_dict)
    model_class = CLIPTextModelWithProjection if "WithProjection" in config_dict["architectures"][0] else CLIPTextModel
    convert = convert_clip_state_dict
  else:
    config, model_class, convert = T5Config.from_transformers_config(config_dict), T5EncoderModel, convert_t5_state_dict
  shapes = param_shapes(nnx.eval_shape(lambda: model_class(config, rngs=nnx.Rngs(0))))
  params, _ = convert(tensors, shapes)
  model = load_converted(model_class, config, params)
  return torch_model, model, JittedEncoder(model)


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
  return str(tmp_path_factory.mktemp("text_encoders"))


def prompts(pad_id: int, lengths=(TOKENS, 9, 4)) -> tuple[np.ndarray, np.ndarray]:
  """(ids, mask) of a padded batch: bos, random words, end-of-text, then `pad_id` up to TOKENS."""
  rng = np.random.default_rng(1)
  ids = np.full((len(lengths), TOKENS), pad_id, np.int32)
  mask = np.zeros((len(lengths), TOKENS), np.int32)
  for row, n in enumerate(lengths):
    ids[row, :n] = [VOCAB - 2, *rng.integers(3, VOCAB - 3, n - 2), EOT]
    mask[row, :n] = 1
  return ids, mask


def rel_err(ours, theirs) -> float:
  theirs = np.asarray(theirs.detach().numpy() if isinstance(theirs, torch.Tensor) else theirs, np.float64)
  return float(np.max(np.abs(np.asarray(ours, np.float64) - theirs)) / np.max(np.abs(theirs)))


def assert_matches(ours, theirs, what: str, tol: float = 1e-4):
  err = rel_err(ours, theirs)
  assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


def slow(*values):
  return pytest.param(*values, marks=pytest.mark.slow)


# diffusers' SD and SDXL pipelines pass no mask to CLIP; PixArt passes T5 one
@pytest.mark.parametrize("name,masked", [("quick_gelu", False), ("gelu_argmax", False), ("quick_gelu", True),
                                         slow("gelu_argmax", True)])
def test_clip_matches_transformers(name, masked, tmp_root):
  torch_model, _, encode = converted("clip", name, tmp_root)
  ids, mask = prompts(torch_model.config.pad_token_id)
  out = encode(ids, mask if masked else None)
  with torch.no_grad():
    ref = torch_model(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask) if masked else None,
                      output_hidden_states=True)
  assert len(out.hidden_states) == len(ref.hidden_states) == TINY_CLIP["num_hidden_layers"] + 1
  for i, (ours, theirs) in enumerate(zip(out.hidden_states, ref.hidden_states)):
    assert_matches(ours, theirs, f"hidden_states[{i}]")
  assert_matches(out.last_hidden_state, ref.last_hidden_state, "last_hidden_state")
  if isinstance(torch_model, transformers.CLIPTextModelWithProjection):
    assert_matches(out.text_embeds, ref.text_embeds, "text_embeds")
    assert out.text_embeds.shape == (len(ids), TINY_CLIP["projection_dim"])
  else:
    assert out.text_embeds is None
    assert_matches(out.pooler_output, ref.pooler_output, "pooler_output")
  # pooled at the first end-of-text id (padding repeats it after), or, for eos_token_id 2, the largest id
  text_ends = np.array([TOKENS - 1, 8, 3])  # where prompts() put each end-of-text token
  np.testing.assert_array_equal(out.pooler_output, np.asarray(out.last_hidden_state)[np.arange(3), text_ends])


def test_clip_argmax_pooling_follows_the_largest_id(tmp_root):
  """eos_token_id 2 pools at the largest id even where it is not the end of the text, as transformers."""
  torch_model, _, encode = converted("clip", "gelu_argmax", tmp_root)
  ids, _ = prompts(0)
  ids[:, 2] = EOT  # ahead of every prompt's own end-of-text token
  with torch.no_grad():
    ref = torch_model(torch.tensor(ids, dtype=torch.long))
  assert_matches(encode(ids).text_embeds, ref.text_embeds, "text_embeds")


@pytest.mark.parametrize("name,masked", [("gated-gelu", True), ("relu", True), slow("gated-gelu", False)])
def test_t5_matches_transformers(name, masked, tmp_root):
  torch_model, _, encode = converted("t5", name, tmp_root)
  ids, mask = prompts(0)
  out = encode(ids, mask if masked else None)
  with torch.no_grad():
    ref = torch_model(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask) if masked else None,
                      output_hidden_states=True)
  assert len(out.hidden_states) == len(ref.hidden_states) == TINY_T5["num_layers"] + 1
  for i, (ours, theirs) in enumerate(zip(out.hidden_states, ref.hidden_states)):
    assert_matches(ours, theirs, f"hidden_states[{i}]")
  assert_matches(out.last_hidden_state, ref.last_hidden_state, "last_hidden_state")
  assert out.pooler_output is None


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 12), (64, 256), (6, 20)])
def test_relative_position_buckets_match_transformers(num_buckets, max_distance):
  length = 2 * max_distance + 40  # every bucket, both directions, and past max_distance
  relative = torch.arange(length)[None, :] - torch.arange(length)[:, None]
  expected = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
      relative, bidirectional=True, num_buckets=num_buckets, max_distance=max_distance)
  ours = relative_position_buckets(length, length, num_buckets=num_buckets, max_distance=max_distance)
  np.testing.assert_array_equal(ours, expected.numpy())


# ---------------------------------------------------------------------------------- keymaps

def test_clip_keymap_reads_the_older_layout(tmp_root):
  """A checkpoint written before transformers 5 (every key under text_model., the position_ids buffer)
  gives the same params as transformers 5's own layout, with notes saying what changed."""
  _, folder = saved("clip", "quick_gelu", tmp_root)
  v5 = read_safetensors(f"{folder}/model.safetensors")
  assert not any(k.startswith("text_model.") for k in v5)  # what transformers 5 writes for a CLIPTextModel
  older = {f"text_model.{k}": v for k, v in v5.items()}
  older[POSITION_IDS] = np.arange(TINY_CLIP["max_position_embeddings"], dtype=np.int64)[None]
  shapes = param_shapes(abstract(CLIPTextModel, CLIPTextConfig.from_transformers_config(TINY_CLIP)))
  from_v5, notes_v5 = convert_clip_state_dict(v5, shapes)
  from_older, notes_older = convert_clip_state_dict(older, shapes)
  assert from_v5.keys() == from_older.keys() == shapes.keys()
  for path in shapes:
    np.testing.assert_array_equal(from_v5[path], from_older[path])
  assert len(notes_v5) == 1 and "prefix" in notes_v5[0]
  assert len(notes_older) == 1 and "position_ids" in notes_older[0]

  with pytest.raises(ValueError, match="position_ids .* is not 0, 1"):
    convert_clip_state_dict({**older, POSITION_IDS: np.arange(16)[None] + 1}, shapes)
  with pytest.raises(ValueError, match="both with and without"):
    convert_clip_state_dict({**older, "final_layer_norm.bias": v5["final_layer_norm.bias"]}, shapes)


def test_clip_keymap_is_strict(tmp_root):
  _, folder = saved("clip", "gelu_argmax", tmp_root)
  tensors = read_safetensors(f"{folder}/model.safetensors")
  config = CLIPTextConfig.from_transformers_config(json.loads(open(f"{folder}/config.json").read()))
  shapes = param_shapes(nnx.eval_shape(lambda: CLIPTextModelWithProjection(config, rngs=nnx.Rngs(0))))
  broken = dict(tensors)
  del broken["text_projection.weight"]
  broken["text_model.encoder.layers.0.self_attn.q_proj.weight"] = np.zeros((32, 31), np.float32)
  broken["text_model.pooler.weight"] = np.zeros((4, 4), np.float32)
  with pytest.raises(ValueError) as e:
    convert_clip_state_dict(broken, shapes)
  message = str(e.value)
  assert message.startswith("transformers CLIP text encoder checkpoint does not fit")
  assert "1 unknown source keys" in message and "text_model.pooler.weight" in message
  assert "1 missing params" in message and "text_projection.kernel" in message
  assert "1 shape mismatches" in message and "q_proj" in message
  # a CLIPTextModel checkpoint into the model with projection: the projection is missing
  plain = read_safetensors(f"{saved('clip', 'quick_gelu', tmp_root)[1]}/model.safetensors")
  with pytest.raises(ValueError, match="text_projection.kernel"):
    convert_clip_state_dict(plain, shapes)


def test_t5_keymap_unties_the_embedding(tmp_root):
  _, folder = saved("t5", "gated-gelu", tmp_root)
  v5 = read_safetensors(f"{folder}/model.safetensors")
  assert SHARED in v5 and TIED not in v5  # transformers 5 saves the tied table once
  config = T5Config.from_transformers_config(json.loads(open(f"{folder}/config.json").read()))
  shapes = param_shapes(nnx.eval_shape(lambda: T5EncoderModel(config, rngs=nnx.Rngs(0))))
  reference, notes = convert_t5_state_dict(v5, shapes)
  assert notes == []
  both, notes_both = convert_t5_state_dict({**v5, TIED: v5[SHARED].copy()}, shapes)
  only_tied = {k: v for k, v in v5.items() if k != SHARED} | {TIED: v5[SHARED]}
  from_tied, notes_tied = convert_t5_state_dict(only_tied, shapes)
  for path in shapes:
    np.testing.assert_array_equal(both[path], reference[path])
    np.testing.assert_array_equal(from_tied[path], reference[path])
  assert "checked equal" in notes_both[0] and "read as" in notes_tied[0]
  with pytest.raises(ValueError, match="differs from shared.weight"):
    convert_t5_state_dict({**v5, TIED: v5[SHARED] + 1}, shapes)
  with pytest.raises(ValueError, match=r"T5 encoder checkpoint does not fit(.|\n)*decoder.block.0.layer.0"):
    convert_t5_state_dict({**v5, "decoder.block.0.layer.0.SelfAttention.q.weight": np.zeros((32, 32))}, shapes)


# ---------------------------------------------------------------------------------- configs, inputs, jit

def test_configs_accept_what_transformers_writes(tmp_root):
  """Every key of transformers' own configs (its generic PretrainedConfig keys and the saved files)."""
  assert set(transformers.PretrainedConfig().to_dict()) - {"_name_or_path"} <= GENERIC_CONFIG_KEYS
  for kind, name in (("clip", "quick_gelu"), ("clip", "gelu_argmax"), ("t5", "gated-gelu"), ("t5", "relu")):
    folder = saved(kind, name, tmp_root)[1]
    config_class = CLIPTextConfig if kind == "clip" else T5Config
    config_class.from_transformers_config(json.loads(open(f"{folder}/config.json").read()))
  # transformers 4 also wrote its generation defaults into every config
  v4_keys = dict(transformers.GenerationConfig().to_diff_dict(), torch_dtype="float32", num_beams=1, top_k=50,
                 output_scores=False, use_bfloat16=False, is_decoder=False, tokenizer_class=None)
  v4_keys = {k: v for k, v in v4_keys.items() if k != "transformers_version"}
  CLIPTextConfig.from_transformers_config({**TINY_CLIP, **v4_keys})
  assert T5Config.from_transformers_config({**TINY_T5, "feed_forward_proj": "gated-gelu"}).dense_act_fn == "gelu_new"


def test_configs_refuse_what_dfjax_does_not_build():
  with pytest.raises(ValueError, match=r"unknown CLIP text config keys \['rope_theta'\]"):
    CLIPTextConfig.from_transformers_config({**TINY_CLIP, "rope_theta": 1e4})
  with pytest.raises(ValueError, match="hidden_act='tanh' is not an activation.*'quick_gelu'"):
    CLIPTextConfig.from_transformers_config({**TINY_CLIP, "hidden_act": "tanh"})
  with pytest.raises(ValueError, match="model_type='clip_vision_model'"):
    CLIPTextConfig.from_transformers_config({**TINY_CLIP, "model_type": "clip_vision_model"})
  with pytest.raises(ValueError, match="hidden_size=32 does not split into num_attention_heads=5"):
    CLIPTextConfig.from_transformers_config({**TINY_CLIP, "num_attention_heads": 5})
  with pytest.raises(ValueError, match="eos_token_id=None must be a token id below vocab_size=99"):
    CLIPTextConfig.from_transformers_config({**TINY_CLIP, "eos_token_id": None})
  with pytest.raises(ValueError, match="is_decoder=true"):
    T5Config.from_transformers_config({**TINY_T5, "is_decoder": True})
  with pytest.raises(ValueError, match="dense_act_fn='relu' .*means 'gelu_new'"):
    T5Config.from_transformers_config({**TINY_T5, "feed_forward_proj": "gated-gelu", "dense_act_fn": "relu"})
  with pytest.raises(ValueError, match="feed_forward_proj='gated-tanh'"):
    T5Config.from_transformers_config({**TINY_T5, "feed_forward_proj": "gated-tanh"})
  with pytest.raises(ValueError, match="d_kv=0 must be"):
    T5Config(**{**TINY_T5, "d_kv": 0})


def abstract(model_class, config):
  return nnx.eval_shape(lambda: model_class(config, rngs=nnx.Rngs(0)))


def test_bad_token_batches_are_named():
  clip = abstract(CLIPTextModel, CLIPTextConfig.from_transformers_config(TINY_CLIP))
  with pytest.raises(ValueError, match="17 tokens, but the model has 16 positions"):
    clip(jnp.zeros((1, 17), jnp.int32))
  with pytest.raises(ValueError, match=r"attention_mask of shape \(1, 3\) must match input_ids' \(1, 4\)"):
    clip(jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 3), jnp.int32))
  with pytest.raises(ValueError, match="integer token ids of shape"):
    abstract(T5EncoderModel, T5Config(**TINY_T5))(jnp.zeros((4,), jnp.int32))


def test_jitted_encoder_compiles_once_per_shape(tmp_root):
  torch_model, model, _ = converted("t5", "relu", tmp_root)
  encode = JittedEncoder(model)
  ids, mask = prompts(0)
  first = encode(ids, mask)
  again = encode(ids[::-1], mask[::-1])  # other values, same shapes: the same program
  assert encode.compiled_programs == 1
  np.testing.assert_array_equal(again.last_hidden_state[::-1], first.last_hidden_state)
  shorter = encode(ids[:, :8], mask[:, :8])
  assert encode.compiled_programs == 2
  with torch.no_grad():
    ref = torch_model(torch.tensor(ids[:, :8], dtype=torch.long), attention_mask=torch.tensor(mask[:, :8]))
  assert_matches(shorter.last_hidden_state, ref.last_hidden_state, "last_hidden_state")


def test_params_name_their_axes():
  for model in (abstract(CLIPTextModelWithProjection, CLIPTextConfig.from_transformers_config(TINY_CLIP)),
                abstract(T5EncoderModel, T5Config(**TINY_T5, feed_forward_proj="gated-gelu"))):
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
      axes = variable.get_metadata()["out_sharding"]
      assert len(axes) == variable.ndim and set(axes) <= set(PARAM_AXES), (path, axes)


@pytest.mark.slow
@pytest.mark.parametrize("kind,name", [("clip", "gelu_argmax"), ("t5", "gated-gelu")])
def test_bf16_error_is_transformers_bf16_error(kind, name, tmp_root):
  """bf16 params and activations (fp32 norms and softmax) stray from fp32 no more than transformers' own
  bf16 model does (about 1 % for the tiny CLIP, 5 % for the tiny T5, whose scores are unscaled)."""
  torch_model, model, encode = converted(kind, name, tmp_root)
  ids, mask = prompts(0)
  fp32 = encode(ids, mask).last_hidden_state
  config = model.config
  bf16 = nnx.eval_shape(lambda: type(model)(config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16))
  graphdef, _ = nnx.split(bf16)
  state = jax.tree.map(lambda a: a.astype(jnp.bfloat16), nnx.split(model)[1])
  ours = JittedEncoder(nnx.merge(graphdef, state))(ids, mask).last_hidden_state
  assert ours.dtype == jnp.bfloat16
  with torch.no_grad():
    theirs = torch_model.to(torch.bfloat16)(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask))
    torch_model.float()
  torch_err = rel_err(theirs.last_hidden_state.float(), fp32)
  assert rel_err(ours.astype(jnp.float32), fp32) <= 2 * torch_err
