"""Evaluations of a trained encoder, as DINO and DoRA users run them (`dora-eval`, and
`config.evals` during pretraining).

  registry       The evaluations by kind: TYPE -> its module (knn, seg, davis, discover, track),
                 each owning its settings, its run on a backbone, its report and its summary.

  knn            DINO's weighted k-NN classifier on [CLS] features (`knn_classifier`,
                 `evaluate_knn`).
  features       Data-parallel feature extraction (`Encoder`, `extract_features`) of the images of
                 `dora_jax.data.images` (sources and DINO's evaluation view).
  davis          DAVIS-2017 video object segmentation by label propagation, and J&F
                 (`evaluate_davis`).
  propagation    Label propagation between frames within a window of patches (`propagate`).
  track          Tracking IoU of the DoRA kernels on the synthetic walking tour
                 (`evaluate_tracking`).
  seg            Linear segmentation readout (DINOv2's linear head) and mmseg's mIoU
                 (`evaluate_seg`, `mean_iou`, `intersect_and_union`).
  seg_data       Images with label maps: the ADE20K layout or tfds (`open_seg_source`).
  discover       LOST object discovery and its CorLoc (`lost`, `corloc`, `evaluate_discovery`).
  voc            PASCAL VOC detection folders and box conventions (`list_images`).
  probe          A linear probe (logistic regression) on frozen features (`linear_probe`).
  periodic       The evaluations during pretraining (`PeriodicEvaluator` of `config.evals`).

The public functions are also reachable here (`from dora_jax.evaluation import evaluate_seg`);
they load their module on first use, so importing the package stays cheap for command lines that
only parse their flags.
"""
import importlib

# Public name -> the module that owns it.
_EXPORTS = {
    "knn_classifier": "knn", "evaluate_knn": "knn",
    "Encoder": "features", "extract_features": "features",
    "evaluate_davis": "davis",
    "evaluate_tracking": "track",
    "evaluate_seg": "seg", "mean_iou": "seg", "intersect_and_union": "seg",
    "SegSettings": "seg",
    "open_seg_source": "seg_data",
    "evaluate_discovery": "discover", "lost": "discover", "corloc": "discover",
    "list_images": "voc",
    "linear_probe": "probe",
    "PeriodicEvaluator": "periodic",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'dora_jax.evaluation' has no attribute {name!r}")
  return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(__all__))
