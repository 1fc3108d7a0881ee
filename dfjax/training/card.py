"""MODEL_CARD.md of a `dfjax train` export: data, model, run, loss curve, machine — from the run's record."""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

MODEL_CARD = "MODEL_CARD.md"
QUALITY = "quality.json"  # `dfjax bench quality --record`'s figures of the folder's samples, quoted by the card
_CURVE_ROWS = 16  # loss-curve rows shown in the card (loss.csv has them all)
_TARGETS = {"epsilon": "noise", "v_prediction": "velocity v = sqrt(ᾱ)·ε − sqrt(1−ᾱ)·x0",
            "sample": "clean image"}
# What a `--frozen-encoder` run's training.json, latent_encoder.json and card say its model is.
LATENTS_NOTE = ("trained on the latents of a fixed-seed stand-in VAE encoder (random weights, never trained, "
                "in latent_encoder/): its samples are latents, not images, and there is no decoder")


def model_card(training: Mapping[str, Any], denoiser_config: Mapping[str, Any],
               scheduler_config: Mapping[str, Any], classes: Mapping[str, Any],
               num_params: int, loss_rows: Sequence[tuple[int, float, float]],
               quality: Mapping[str, Any] | None = None) -> str:
  """The card's markdown text.

  `classes`: class_tokens.json (a UNet's token table) or classes.json (a DiT's) of the export.
  `quality`: the folder's QUALITY record (`dfjax bench quality --record`), quoted under Limits; None:
  not measured, and the card says how to measure it.
  A `--frozen-encoder` run (training["latent_encoder"]) gets a card of what its latents are instead
  of the embedded models' claims.
  """
  cfg, machine = training["config"], training["machine"]
  hours, minutes = divmod(round(training["wall_seconds"] / 60), 60)
  wall = f"{hours} h {minutes} min" if hours else f"{minutes} min"
  family = _FAMILIES[denoiser_config.get("_class_name", "UNet2DConditionModel")]
  latent, grown = training.get("latent_encoder"), training.get("grown_from")
  lines = [
      f"# dfjax default {family.title}" if latent is None else f"# dfjax {family.kind}, trained on latents",
      "",
      f"A small class-conditional {family.kind} (diffusers `{family.diffusers}` architecture, run by dfjax's",
      *(_describe_pixels(family, grown) if latent is None else _describe_latents(latent)),
      "",
      "## Reproduce",
      "",
      *(["```", training["command"], "```"] if grown is None else _reproduce_grown(training)),
      "",
      f"Fixed seed {cfg['seed']}: initial weights, every batch, noise draw and label drop are functions",
      f"of (seed, step), so the {'command gives' if grown is None else 'commands give'} the same weights "
      "again, also when interrupted and",
      "continued with `--resume` (same flags).",
      "",
      "## Data",
      "",
      f"`dfjax.data`: {training['data']['image_size']}×{training['data']['image_size']} RGB in [-1, 1], "
      f"{len(classes['class_names'])} classes drawn procedurally (nothing downloaded):",
      ", ".join(f"{i} `{name}`" for i, name in enumerate(classes["class_names"])) + ".",
      "Random colours (light on dark or dark on light), two-colour gradient backgrounds, random",
      "position, size and angle within a class. Step s trains on the fresh batch",
      f"`dfjax.data.batch(({cfg['seed']}, s), {cfg['batch']})`: {training['images_seen']:,} images "
      "seen, none twice.",
      "",
      "## Model",
      "",
      *family.describe(denoiser_config, classes, num_params, training.get("frozen_text")),
      *(family.fresh_init if grown is None else _grown_init(grown, denoiser_config["num_layers"])),
      f"- Noise schedule (`scheduler_config.json`): {scheduler_config['beta_schedule']} betas "
      f"{scheduler_config['beta_start']}–{scheduler_config['beta_end']}, "
      f"{scheduler_config['num_train_timesteps']} training timesteps, "
      f"{scheduler_config['prediction_type']} prediction ({_TARGETS[scheduler_config['prediction_type']]}); sample with DDIM (or Euler, DPM-Solver++) "
      "and guidance scale 3–5.",
      "",
      "## Training",
      "",
      f"- {cfg['steps']:,} steps of batch {cfg['batch']}; AdamW (β = 0.9, 0.99, weight decay "
      f"{cfg['weight_decay']}), peak learning rate {cfg['lr']:g} after {cfg['warmup_steps']} warm-up "
      + (f"steps, cosine decay to {cfg['lr'] * cfg['final_lr_fraction']:g}" if cfg["cosine"]
         else "steps, then constant")
      + f"; gradient clipping at global norm {cfg['grad_clip']:g}.",
      f"- Loss: mean squared error of the predicted {_TARGETS[scheduler_config['prediction_type']]} at "
      "uniformly drawn timesteps; labels "
      f"replaced by the null class with probability {cfg['label_drop']:g}.",
      f"- Weights shipped: {'the EMA (decay ' + format(cfg['ema_decay'], 'g') + ')' if training['exported_weights'] == 'ema' else 'the trained params'}.",
      f"- Wall time: {wall} ({training['wall_seconds']:.0f} s, compilation included) on "
      f"{machine['cpu']}, {machine['cpu_cores']} CPU cores ({machine['device_kind']}, "
      f"jax {machine['jax']}), shared with other jobs.",
      f"- Final loss (mean of the last {cfg['log_every']} steps): {training['final_loss']:.4f}.",
      *([] if grown is None else [
          f"- Before that, the source: {grown['steps']:,} steps of batch {grown['config']['batch']} "
          f"({grown['wall_seconds']:.0f} s), final loss {grown['final_loss']:.4f} (its own card has the details)."]),
      "",
      "## Loss curve",
      "",
      "Mean training loss over each logging interval (every row is in `loss.csv`):",
      "",
      "| step | loss | learning rate |",
      "|---:|---:|---:|",
  ]
  lines += [f"| {s} | {l:.4f} | {r:.2e} |" for s, l, r in subsample(loss_rows, _CURVE_ROWS)]
  lines += ["", *(_use_pixels(quality, wall) if latent is None else _use_latents(latent)), ""]
  return "\n".join(lines)


def _sources(training: Mapping[str, Any]) -> list[Mapping[str, Any]]:
  """The runs a grown model's run started from, the first (trained from scratch) first."""
  chain, record = [], training.get("grown_from")
  while record is not None:
    chain.insert(0, record)
    record = record.get("grown_from")
  return chain


def _reproduce_grown(training: Mapping[str, Any]) -> list[str]:
  """The commands of the runs a grown model came from, in order, then its own."""
  lines = []
  for i, source in enumerate(_sources(training)):
    then = "First, the" if i == 0 else "Then grow that folder into the"
    lines += [f"{then} {source['num_layers']}-block DiT (sha256 of its model folder's manifest.json: "
              f"`{source['manifest_sha256']}`):", "", "```", source["command"], "```", ""]
  folder = training["grown_from"]["folder"]
  return [*lines,
          f"Then this model: `--grow-from` that run's model folder (here `{folder}`) makes the deeper DiT",
          "start as that model, and every param is fine-tuned:", "", "```", training["command"], "```"]


def _grown_init(grown: Mapping[str, Any], num_layers: int) -> list[str]:
  factor = num_layers // grown["num_layers"]
  return [f"- Grown from the {grown['num_layers']}-block DiT of the first command: at step 0 block {factor}·k was its "
          "block k, the embeddings and",
          f"  the final layer its own, the other {num_layers - grown['num_layers']} blocks fresh adaLN-Zero blocks "
          "(their modulation zero: each the",
          "  identity), so the model started as exactly the source's function; then every param trained."]


def _describe_pixels(family: _Family, grown: Mapping[str, Any] | None) -> list[str]:
  how = "trained from scratch" if grown is None else "grown from a shallower one (see Reproduce) and trained"
  return [f"own Flax NNX port) {how} on dfjax's procedural shapes dataset: a model on which to measure the",
          f"fidelity of {family.parallelism} (`dfjax generate --checkpoint FOLDER`). It draws 64×64 RGB pixels",
          "directly (no VAE)."]


def _describe_latents(latent: Mapping[str, Any]) -> list[str]:
  h, w, channels = latent["latent_shape"]
  side = latent["image_size"]
  return [
      "own Flax NNX port) trained from scratch on dfjax's procedural shapes dataset.",
      f"It was {latent['note']}.",
      f"It draws {h}×{w}×{channels} latents: those the frozen `{latent['name']}` encoder (weights from the "
      f"fixed seed {latent['seed']}, the same in every run) makes of {side}×{side} RGB images, "
      f"{latent['latents']}; `config.json`'s sample_size ({h}) is the latents' side.",
      "No decoder was ever made or trained, so nothing turns the samples into images: `dfjax generate`",
      "refuses the model, and its samples can be compared only with the encoder's latents of real images."]


def _use_pixels(quality: Mapping[str, Any] | None, wall: str) -> list[str]:
  return [
      "## Use",
      "",
      "```python",
      "import dfjax",
      "from dfjax.training import load_trained",
      "model = load_trained(FOLDER)",
      "cond, uncond = model.conditioning(labels)                # (B,) class ids; uncond: the null class",
      "images = dfjax.sample(model.denoiser, noise_b64643, cond, uncond=uncond,",
      "                      scheduler_config=model.scheduler_config, num_steps=50,",
      "                      guidance_scale=4.0)                # (B, 64, 64, 3) in [-1, 1]",
      "```",
      "",
      "## Limits",
      "",
      f"A few-MB model trained for {wall} on a CPU. It exists to make the artefacts of parallel sampling",
      "visible and measurable, not as an image generator.",
      "",
      *_measured_quality(quality)]


def _measured_quality(quality: Mapping[str, Any] | None) -> list[str]:
  """What `dfjax bench quality --record` measured of this folder's samples (QUALITY), or how to measure it."""
  if quality is None:
    return ["Its sample quality was not measured: `dfjax bench quality --checkpoint FOLDER --record` measures it",
            f"and writes it here ({QUALITY})."]
  cfg = quality["config"]
  missed = [f"{name} {100 * share:.0f} %" for name, share in quality["per_class"].items() if share < 1]
  return textwrap.wrap(f"`{quality['command']}` ({cfg['samples']} samples, classes in turn, {cfg['steps']}-step DDIM, guidance "
          f"{cfg['guidance_scale']:g}; {quality['machine']}): the shipped shapes classifier recognises "
          f"{100 * quality['accuracy']:.0f} % of them"
          + (f" (below 100 %: {', '.join(missed)})" if missed else "")
          + f"; Fréchet classifier distance {quality['frechet']:.2f} ± {quality['frechet_std']:.2f} (bootstrap "
          f"std; dataset images at the same count: {quality['dataset_floor']:.2f}). Every figure is in {QUALITY}.",
                       width=100, break_on_hyphens=False)


def _use_latents(latent: Mapping[str, Any]) -> list[str]:
  h, w, channels = latent["latent_shape"]
  side = latent["image_size"]
  return [
      "## Use",
      "",
      "```python",
      "from dfjax.training import load_trained",
      "from dfjax.training.export import load_latent_encoder",
      "model, encoder = load_trained(FOLDER), load_latent_encoder(FOLDER)",
      "cond, uncond = model.conditioning(labels)                # (B,) class ids; uncond: the null class",
      f"latents = dfjax.sample(model.denoiser, noise_b{h}{w}{channels}, cond, uncond=uncond,",
      "                       scheduler_config=model.scheduler_config, num_steps=50,",
      f"                       guidance_scale=4.0)               # (B, {h}, {w}, {channels}) latents, not images",
      f"reference = encoder.encode(images)                       # (B, {side}, {side}, 3) in [-1, 1] → "
      f"(B, {h}, {w}, {channels})",
      "```",
      "",
      "## Limits",
      "",
      "A model of a pipeline whose pretrained VAE is replaced by a random stand-in encoder: it exists to",
      "run DiffusionPipe's frozen-encoder training end to end, not to draw. Its samples are latents that",
      "no decoder turns into images."]


class _Family(NamedTuple):
  """How the card names and describes one model family."""

  title: str
  kind: str
  diffusers: str
  parallelism: str
  describe: Callable[[Mapping[str, Any], Mapping[str, Any], int, Mapping[str, Any] | None], list[str]]
  fresh_init: tuple[str, ...] = ()  # how a run trained from scratch initialises it, when notable


def _describe_unet(config: Mapping[str, Any], tokens: Mapping[str, Any], num_params: int,
                   text: Mapping[str, Any] | None) -> list[str]:
  token_params = (tokens["num_classes"] + 1) * tokens["num_tokens"] * tokens["dim"]
  unet = [
      f"- UNet: block_out_channels {config['block_out_channels']}, down blocks "
      f"{', '.join(config['down_block_types'])}; {config['layers_per_block']} resnet(s) "
      f"per level, GroupNorm({config['norm_num_groups']}), heads "
      f"{config['attention_head_dim']}, self- and cross-attention (linear projections) at the "
      f"attention levels and the mid block; {num_params:,} params."]
  if text is None:
    return [*unet, f"- Class tokens: {tokens['num_tokens']} learned tokens of width {tokens['dim']} per class "
                   f"(the UNet's `encoder_hidden_states`), plus the null class id {tokens['null_id']} for "
                   f"classifier-free guidance; {token_params:,} params."]
  clip = text["config"]
  captions = ", ".join(f"{i} \"{caption}\"" for i, caption in enumerate(text["captions"]))
  return [*unet,
          f"- Context (`encoder_hidden_states`, `class_tokens/`): {text['note']}. The `{text['name']}` encoder: "
          f"a CLIP text model of {clip['num_hidden_layers']} layers, width {clip['hidden_size']}, "
          f"{clip['num_attention_heads']} heads, {text['tokens']} positions, over a {len(text['vocab'])}-token "
          f"word vocabulary, weights from the fixed seed {text['seed']}. Captions by class id (the null class "
          f"{tokens['null_id']}, for classifier-free guidance, the empty one): {captions}."]


def _describe_dit(config: Mapping[str, Any], classes: Mapping[str, Any], num_params: int,
                  text: Mapping[str, Any] | None) -> list[str]:
  del text  # a DiT reads no text
  p, side = config["patch_size"], config["sample_size"]
  heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
  return [
      f"- DiT: {config['num_layers']} adaLN-Zero blocks of width {heads * head_dim} ({heads} heads of "
      f"{head_dim}), {p}×{p}-pixel patches ({side // p}×{side // p} = {(side // p) ** 2} tokens, "
      f"{side // p} token rows), fixed 2-D sin-cos positions, one output per pixel channel (no learned "
      f"variance); {num_params:,} params.",
      f"- Classes: the DiT's own class embedding ({classes['num_classes']} classes plus the null class id "
      f"{classes['null_id']} for classifier-free guidance), added to the timestep embedding."]


_FAMILIES = {
    "UNet2DConditionModel": _Family("model", "UNet", "UNet2DConditionModel", "patch-parallel sampling",
                                    _describe_unet),
    "DiTTransformer2DModel": _Family("DiT", "diffusion transformer", "DiTTransformer2DModel",
                                     "sequence- and patch-parallel sampling", _describe_dit,
                                     ("- Initialised as in the DiT paper (adaLN-Zero): every block's modulation and the "
                                      "final layer", "  start at zero.")),
}


def subsample(rows: Sequence[tuple[int, float, float]], count: int) -> list[tuple[int, float, float]]:
  """About `count` rows, evenly spaced, always with the first and the last."""
  if len(rows) <= count:
    return list(rows)
  picks = {round(i * (len(rows) - 1) / (count - 1)) for i in range(count)}
  return [rows[i] for i in sorted(picks)]


def write_model_card(folder) -> None:
  """(Re)writes MODEL_CARD.md of an exported model folder from the files beside it."""
  import csv
  import json
  from pathlib import Path

  folder = Path(folder)
  read = lambda name: json.loads((folder / name).read_text())
  with open(folder / "loss.csv", newline="") as f:
    rows = [(int(r["step"]), float(r["loss"]), float(r["learning_rate"])) for r in csv.DictReader(f)]
  classes = next(name for name in ("class_tokens.json", "classes.json") if (folder / name).is_file())
  text = model_card(read("training.json"), read("config.json"), read("scheduler_config.json"),
                    read(classes), read("manifest.json")["num_params"], rows,
                    read(QUALITY) if (folder / QUALITY).is_file() else None)
  (folder / MODEL_CARD).write_text(text)
