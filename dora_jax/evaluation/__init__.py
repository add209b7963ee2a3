"""Evaluations of a trained encoder, as DINO and DoRA users run them (`dora-eval`).

  knn            DINO's weighted k-NN classifier on [CLS] features (`knn_classifier`,
                 `evaluate_knn`).
  features       DINO's evaluation preprocessing and data-parallel feature extraction (`Encoder`,
                 `extract_features`).
  image_sources  Labelled images: an image folder or a tfds dataset (`open_source`).
  davis          DAVIS-2017 video object segmentation by label propagation, and J&F
                 (`evaluate_davis`).
  track          Tracking IoU of the DoRA kernels on the synthetic walking tour
                 (`evaluate_tracking`).
  discover       LOST object discovery and its CorLoc (`lost`, `corloc`, `evaluate_discovery`).
  voc            PASCAL VOC detection folders and box conventions (`list_images`).
  periodic       The evaluators during pretraining (`PeriodicEvaluator`; keys in config_base.py).
"""
