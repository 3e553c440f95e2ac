"""timm (PyTorch, CPU) as the numerical reference for parity tests.

torchvision 0.28.0 exists only as a CUDA build whose C++ ops fail to register on a CPU-only torch; timm imports
torchvision at import time but never calls those ops. Registering their schemas first lets it import.
"""
import numpy as np
import torch

_lib = torch.library.Library('torchvision', 'DEF')
_lib.define('nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')
_lib.define('qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')

import timm  # noqa: E402  (after the schema registration above)

torch.set_num_threads(2)


def create(name_or_class, calibration_size: int = 64, **kwargs) -> torch.nn.Module:
  """A timm model in eval mode with non-trivial random weights and BatchNorm statistics.

  Every float tensor gets noise on the scale of its own spread (timm zero-inits Mixer's head, which would make
  all logits equal). BatchNorm running statistics are first measured on a random batch, then perturbed, so
  they are far from 0/1 yet keep the activations of deep ConvMixers in a sane range (measure them at the
  resolution the test uses: padding effects change the statistics). BatchNorm gains are drawn below 1: with
  gains around 1 a random 32-block ConvMixer is chaotic and amplifies float32 rounding about 1000x (PyTorch's
  own float32 and float64 logits then differ by 1e-4); trained networks are not in that regime.
  """
  torch.manual_seed(0)
  if isinstance(name_or_class, str):
    model = timm.create_model(name_or_class, pretrained=False, **kwargs)
  else:
    model = name_or_class(**kwargs)
  rng = np.random.default_rng(0)
  with torch.no_grad():
    for value in model.parameters():
      spread = float(value.std()) if value.numel() > 1 and float(value.std()) > 0 else 0.1
      value += torch.from_numpy((0.5 * spread * rng.standard_normal(tuple(value.shape))).astype(np.float32))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if norms:
      for norm in norms:
        norm.weight.copy_(torch.from_numpy(rng.uniform(0.4, 0.7, norm.num_features).astype(np.float32)))
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average: the statistics of exactly this batch
      model.train()(torch.from_numpy(rng.standard_normal((4, 3, calibration_size, calibration_size)).astype(np.float32)))
      for norm in norms:
        noise = torch.from_numpy(rng.standard_normal(norm.num_features).astype(np.float32))
        norm.running_mean += 0.05 * noise * norm.running_var.sqrt()
        # the floor keeps channels that were all zero after a ReLU from dividing by sqrt(eps)
        norm.running_var *= torch.from_numpy(rng.uniform(0.9, 1.1, norm.num_features).astype(np.float32))
        norm.running_var += 1e-2
        norm.momentum = 0.1
        norm.num_batches_tracked.zero_()  # as in a fresh model: mixer_jax keeps no such counter
  return model.eval()


def logits(model: torch.nn.Module, images_nhwc: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2).copy())).numpy()
