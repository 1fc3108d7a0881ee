"""The class captions' frozen text encoder (dfjax/training/captions.py), `dfjax train --frozen-text clip`:
its captions and token table; its context against transformers' CLIPTextModel (torch, fp32) holding the
same fixed weights, both as one model call and layer by layer one sample at a time as DiffusionPipe's
bubbles run it; its per-layer FLOPs (what the planner gives the filler) against XLA's count; a DiT refused;
the single-device loss reading the context; and the export: its class-token table is the encoder's output
for every class id, recorded in training.json and the model card, and `dfjax generate` samples it."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from dfjax import commands, data
from dfjax.generation import GenerateConfig, generate
from dfjax.training import TrainConfig, load_trained
from dfjax.training.captions import END, START, TEXT_SEED, CaptionEncoder
from dfjax.training.fixed_weights import fixed_seed_params
from dfjax.training.loop import FAST_COMPILE, _graphdef, _loss, export_run
from dfjax.training.model import run_spec
from dfjax.training.pipeline_frozen import condition_part
from dfjax.training.pipeline_plan import PipelineConfig, make_plan
from models.clip import CLIPTextModel

DIM = run_spec("tiny").token_dim  # the tiny UNet's cross_attention_dim
LABELS = np.arange(data.num_classes + 1)  # every class and the null class


@functools.cache
def _encoder():
  return CaptionEncoder(data.class_names, DIM)


def _torch_clip(encoder: CaptionEncoder) -> torch.nn.Module:
  """transformers' CLIPTextModel of the encoder's config holding its fixed weights (our layout mapped back
  by hand: Linear kernels transposed, LayerNorm scale → weight, Embed embedding → weight; transformers 5's
  keys lack our `text_model.` prefix; every key loaded)."""
  c = encoder.config
  model = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
      projection_dim=c.projection_dim, num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
      max_position_embeddings=c.max_position_embeddings, hidden_act=c.hidden_act, layer_norm_eps=c.layer_norm_eps,
      eos_token_id=c.eos_token_id, pad_token_id=c.eos_token_id, bos_token_id=c.eos_token_id - 1))
  state = {}
  for path, value in nnx.to_flat_state(fixed_seed_params(CLIPTextModel, c, TEXT_SEED)):
    *module, leaf = [str(p) for p in path]
    value = np.asarray(value)
    if leaf == "kernel":
      leaf, value = "weight", value.T
    elif leaf in ("scale", "embedding"):
      leaf = "weight"
    state[".".join([*module, leaf]).removeprefix("text_model.")] = torch.from_numpy(value.copy())
  missing, unexpected = model.load_state_dict(state, strict=False)
  assert not unexpected and set(missing) <= {"embeddings.position_ids"}, (missing, unexpected)
  return model.eval()


@functools.cache
def _transformers_context() -> np.ndarray:
  """(K+1, T, D): transformers' last hidden state of every class's caption."""
  encoder = _encoder()
  with torch.no_grad():
    ids = torch.from_numpy(encoder.captions.ids.astype(np.int64))
    return _torch_clip(encoder)(input_ids=ids).last_hidden_state.numpy()


def test_captions_are_fixed_per_class_and_the_null_class_is_empty():
  captions = _encoder().captions
  assert captions.texts[3] == "a picture of horizontal bands" and captions.texts[-1] == ""
  ids, vocab = captions.ids, captions.vocab
  assert ids.shape == (data.num_classes + 1, captions.tokens) == (11, 7)  # "a picture of concentric squares" + 2
  assert len({tuple(row) for row in ids}) == len(ids)  # a distinct caption per class
  start, end = vocab.index(START), vocab.index(END)
  assert list(ids[-1]) == [start] + [end] * (captions.tokens - 1)  # the null class: start, end, end padding
  for text, row in zip(captions.texts, ids):
    words = text.split()
    assert [vocab[i] for i in row[1:1 + len(words)]] == words and row[0] == start
    assert set(row[1 + len(words):]) == {end}
  assert end == len(vocab) - 1 == _encoder().config.eos_token_id  # CLIP's end-of-text: the largest id


def test_caption_encoder_equals_transformers_clip_on_its_fixed_weights():
  """The context as `dfjax train` reads it (one model call on the batch) and as the bubbles make it (the
  pipeline's text part, layer by layer, one sample at a time) both equal transformers' on the captions."""
  encoder = _encoder()
  expected = _transformers_context()
  got = np.asarray(jax.jit(encoder)(jnp.asarray(LABELS)))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  part = condition_part(run_spec("tiny", "clip"))
  assert [layer.name for layer in part.layers] == ["embeddings", "encoder.layers.0", "encoder.layers.1",
                                                   "final_layer_norm"]
  graphdef = nnx.split(part.abstract(None), nnx.Param)[0]
  layered = jax.jit(lambda p, labels: part.run(nnx.merge(graphdef, p), labels))(part.params(None), jnp.asarray(LABELS))
  np.testing.assert_allclose(np.asarray(layered), expected, rtol=1e-5, atol=1e-5)
  assert np.std(expected[:-1] - expected[-1:]) > 0.1  # the classes' contexts differ from the null class's
  # the weights are the fixed seed's, whatever the run's
  assert encoder.record()["seed"] == TEXT_SEED


def test_text_encoder_layer_costs_match_xla_cost_analysis():
  """The filler's per-layer jobs are the text encoder's real work: each CLIP layer's analytic FLOPs per
  sample against XLA's count of that layer compiled on one caption; the embeddings and the final layer
  norm (no matrix work) are costed by their T × D values, below XLA's elementwise count of them."""
  plan = make_plan(PipelineConfig(2, 2, 2, "diffusionpipe"), "tiny", 16, (8, 8, 3), frozen_text="clip")
  part = plan.frozen_parts[0]
  graphdef, params = nnx.split(nnx.eval_shape(lambda: CLIPTextModel(part.config, rngs=nnx.Rngs(0))))
  x = jax.ShapeDtypeStruct((1, part.captions.tokens), jnp.int32)
  for index, layer in enumerate(part.layers):
    run = jax.jit(lambda p, x, index=index: nnx.merge(graphdef, p).text_model.run_layer(index, x),
                  compiler_options=FAST_COMPILE)
    cost = run.lower(params, x).compile().cost_analysis()
    xla = (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]
    if layer.name.startswith("encoder.layers."):
      assert 1.0 <= xla / layer.flops < 1.15, (layer.name, xla, layer.flops)  # XLA also counts the elementwise work
    else:
      assert layer.flops == part.captions.tokens * DIM <= xla < 10 * layer.flops, (layer.name, xla)
    x = jax.eval_shape(run, params, x)
    assert tuple(x.shape[1:]) == layer.sample_shape


def test_frozen_text_needs_a_unet():
  with pytest.raises(ValueError, match=r"'dit-tiny' DiT embeds its class labels itself.*UNet variants: default, tiny"):
    TrainConfig(out="", model="dit-tiny", frozen_text="clip")
  with pytest.raises(ValueError, match=r"UNet variants: default, tiny"):
    make_plan(PipelineConfig(2, 2, 1), "dit-tiny", 8, (16, 16, 3), frozen_text="clip")
  with pytest.raises(ValueError, match="unknown frozen text encoder 't5'; valid: none, clip"):
    TrainConfig(out="", model="tiny", frozen_text="t5")


@functools.cache
def _random_unet():
  """The tiny UNet conditioned by the captions, random weights drawn on the host (no initialiser compiled)."""
  rng = np.random.default_rng(0)
  abstract = nnx.eval_shape(lambda: run_spec("tiny", "clip").build(rngs=nnx.Rngs(0)))
  params = nnx.state(abstract, nnx.Param)
  assert set(params) == {"unet"}  # the text encoder has no params: the UNet alone trains
  return nnx.merge(_graphdef("tiny", "clip"),
                   jax.tree.map(lambda a: (0.1 * rng.normal(size=a.shape)).astype(a.dtype), params))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """A `--frozen-text clip` run's export through the trainer's own path (`export_run`)."""
  cfg = TrainConfig(out=str(tmp_path_factory.mktemp("run")), model="tiny", steps=2, batch=4, frozen_text="clip")
  history = {"step": [1, 2], "loss": [0.5, 0.25], "seconds": 3.0}
  return export_run(cfg, _random_unet(), history, "dfjax train --frozen-text clip (test)")


def test_export_stores_the_encoders_context_as_the_class_tokens(exported):
  model = load_trained(exported)
  table = np.asarray(model.class_tokens.embedding[...])
  np.testing.assert_allclose(table, _transformers_context(), rtol=1e-5, atol=1e-5)  # every class id and the null
  assert model.class_tokens.null_id == data.num_classes
  cond, uncond = model.conditioning(np.array([3, 0]))
  np.testing.assert_array_equal(np.asarray(cond.encoder_hidden_states), table[[3, 0]])
  np.testing.assert_array_equal(np.asarray(uncond.encoder_hidden_states), table[[-1, -1]])
  record = json.loads((exported / "training.json").read_text())
  assert record["frozen_text"]["captions"] == list(_encoder().captions.texts)
  assert record["frozen_text"]["seed"] == TEXT_SEED and record["model"]["frozen_text"] == "clip"
  assert record["config"]["frozen_text"] == "clip"
  card = (exported / "MODEL_CARD.md").read_text()
  assert "frozen CLIP text encoder's last hidden state" in card and '3 "a picture of horizontal bands"' in card
  assert "learned tokens" not in card


@pytest.mark.slow  # compiles the tiny UNet's loss: the default exactness case runs loop._loss with the text encoder
def test_single_device_loss_reads_the_exported_context():
  """loop._loss with the frozen text encoder (its context of the dropped labels' captions computed in the
  step) equals loop._loss of the same UNet conditioned by the exported class-token table (a learned-token
  model of the captions' length holding it): what the model trained on is what it ships."""
  unet = nnx.state(_random_unet(), nnx.Param)["unet"]
  table_spec = dataclasses.replace(run_spec("tiny"), num_tokens=_encoder().captions.tokens)
  table_graphdef = nnx.split(nnx.eval_shape(lambda: table_spec.build(rngs=nnx.Rngs(0))), nnx.Param)[0]
  table = nnx.state(_encoder().class_tokens(), nnx.Param)
  text_cfg = TrainConfig(out="", model="tiny", batch=4, frozen_text="clip", label_drop=0.5).static()
  table_cfg = dataclasses.replace(text_cfg, frozen_text="none")
  images, labels = data.batch((0, 0), 4)
  images = images[:, ::8, ::8]  # 8² for speed
  key = jax.random.key(3)

  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  def losses(unet, table):
    text = _loss(nnx.State({"unet": unet}), _graphdef("tiny", "clip"), images, labels, key, text_cfg)
    tabled = _loss(nnx.State({"unet": unet, "class_tokens": table}), table_graphdef, images, labels, key, table_cfg)
    return text, tabled

  text, tabled = losses(unet, table)
  np.testing.assert_allclose(float(text), float(tabled), rtol=1e-6)
  assert float(text) > 0


@pytest.mark.slow
def test_dfjax_train_frozen_text_pipelined_then_generate(tmp_path, capsys):
  """`dfjax train --frozen-text clip` pipelined (its text encoder in the bubbles) for 2 steps, and `dfjax
  generate` sampling its export: the table is the encoder's context, the samples finite."""
  out = tmp_path / "run"
  assert commands.main(["train", "--out", str(out), "--model", "tiny", "--steps", "2", "--batch", "4",
                        "--frozen-text", "clip", "--pipeline-stages", "2", "--micro-batches", "2"]) == 0
  assert "text_encoder" in capsys.readouterr().out  # its pieces in the printed timeline
  model = load_trained(out / "model")
  np.testing.assert_allclose(np.asarray(model.class_tokens.embedding[...]), _transformers_context(), rtol=1e-5,
                             atol=1e-5)
  result = generate(GenerateConfig(checkpoint=str(out / "model"), strategies=("single",), steps=2, images=2, size=16,
                                   out=str(tmp_path / "samples")), progress=False)
  assert result.files and all(f.exists() for f in result.files)
