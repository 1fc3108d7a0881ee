"""Whole text-to-image pipelines: `dfjax.load_pipeline(DIR)` → `pipe(prompt, …)` → images.

pipeline.py loads a converted diffusers pipeline and runs tokenize → encode → sample → decode;
prompts.py encodes prompts as each diffusers pipeline class does; tiny.py builds tiny random diffusers
pipelines (tests, the text-to-image notebook).
"""

from dfjax.pipelines.pipeline import KINDS, StageTimes, TextToImagePipeline, load_pipeline

__all__ = ["KINDS", "StageTimes", "TextToImagePipeline", "load_pipeline"]
