"""Evaluations of a trained encoder, as DINO and DoRA users run them (`dora-eval`).

  knn            DINO's weighted k-NN classifier on [CLS] features (`knn_classifier`,
                 `evaluate_knn`).
  features       Data-parallel feature extraction (`Encoder`, `extract_features`) of the images of
                 `dora_jax.data.images` (sources and DINO's evaluation view).
  davis          DAVIS-2017 video object segmentation by label propagation, and J&F
                 (`evaluate_davis`).
  propagation    Label propagation between frames within a window of patches (`propagate`).
  track          Tracking IoU of the DoRA kernels on the synthetic walking tour
                 (`evaluate_tracking`).
  periodic       The evaluators during pretraining (`PeriodicEvaluator`; keys in config_base.py).
"""
