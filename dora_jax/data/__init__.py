"""Data, without jax: videos to TFRecord shards, the grain pipeline of clips, labelled images.

Modules:
  tfrecord   TFRecord framing + CRC32C, offset indexes and frame Examples, without TensorFlow.
  convert    `dora-convert`: videos, image folders, tfds splits -> shards + manifest.json
             (resumable).
  synthetic  a synthetic walking tour with ground-truth object masks (tests, demo, evaluation).
  source     random access to stored frames and clips (the grain data source).
  views      the clip views of docs/DESIGN.md step 1, with numpy/PIL.
  pipeline   `validate`, `num_clips`, `make_train_iterator`: the grain pipeline.
  images     labelled images (image folder, tfds) and DINO's evaluation view, for k-NN and
             dora-finetune.

Nothing in this package imports jax: grain's worker processes load it.
"""
