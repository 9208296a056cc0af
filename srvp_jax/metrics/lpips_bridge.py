"""LPIPS v0.1 (AlexNet) distances for JAX frames, computed by the `lpips` package in PyTorch.

The official evaluation uses LPIPS v0.1 with AlexNet: frames in [0, 1] rescaled to [-1, 1], grey
frames repeated to 3 channels. The `lpips` wheel ships the linear calibration layers
(lpips/weights/v0.1/alex.pth), but the AlexNet backbone is torchvision's ImageNet model, which
torchvision downloads; offline we read it from torchvision's cache
($TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth) or from a file given by the user. torch and
lpips are imported when first needed (`srvp_jax.import_order`), so that `srvp_jax.metrics` imports without
them.
"""

import dataclasses
import os
import sys
import warnings

import jax.numpy as jnp
import numpy as np

from srvp_jax import import_order

ALEXNET_FILE = 'alexnet-owt-7be5be79.pth'
ALEXNET_URL = 'https://download.pytorch.org/models/' + ALEXNET_FILE
# torchvision AlexNet `features` index of each conv layer -> lpips slice holding it.
_FEATURE_TO_SLICE = {0: 1, 3: 2, 6: 3, 8: 4, 10: 5}


def default_backbone_path():
  """Where torchvision caches the ImageNet AlexNet weights ($TORCH_HOME/hub/checkpoints/...)."""
  torch = import_order.import_torch()
  return os.path.join(torch.hub.get_dir(), 'checkpoints', ALEXNET_FILE)


def check_lpips_available(backbone_path=None):
  """Returns the AlexNet backbone file to use, or raises a one-line error saying what to provide.

  An explicit `backbone_path` must exist; otherwise torchvision's cache file is used.
  """
  if backbone_path is not None:
    if not os.path.isfile(backbone_path):
      raise FileNotFoundError(f'LPIPS AlexNet backbone file {backbone_path} not found: provide torchvision\'s '
                              f'{ALEXNET_FILE} (from {ALEXNET_URL}) at that path')
    return backbone_path
  cached = default_backbone_path()
  if not os.path.isfile(cached):
    raise FileNotFoundError(f'LPIPS needs the torchvision AlexNet weights: download {ALEXNET_URL} to {cached} '
                            f'(or pass its path as backbone_path)')
  return cached


def _backbone_state_dict(path):
  """Loads an AlexNet state dict and maps it to the `slice{k}.{i}.*` names of lpips' backbone.

  Accepts torchvision's `features.{i}.*` keys (classifier keys are ignored) or lpips' own
  `slice{k}.{i}.*` / `net.slice{k}.{i}.*` keys.
  """
  torch = import_order.import_torch()
  try:
    state = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    raise ValueError(f'{path} is not a readable AlexNet weights file ({first}): download it again from '
                     f'{ALEXNET_URL}') from None
  if not isinstance(state, dict):
    raise ValueError(f'{path} does not hold a state dict (got {type(state).__name__}): '
                     'save torchvision AlexNet.state_dict()')
  mapped = {}
  for key, value in state.items():
    parts = key.split('.')
    if parts[0] == 'net':
      parts = parts[1:]
    if parts[0] == 'features' and len(parts) == 3 and int(parts[1]) in _FEATURE_TO_SLICE:
      mapped[f'slice{_FEATURE_TO_SLICE[int(parts[1])]}.{parts[1]}.{parts[2]}'] = value
    elif parts[0].startswith('slice'):
      mapped['.'.join(parts)] = value
  return mapped


class LPIPS:
  """LPIPS v0.1 AlexNet distance between frame batches given as JAX (or NumPy) arrays.

  Runs on torch's GPU when available (or on `device`). Frames are (..., H, W, C), C in {1, 3},
  values in [0, 1]; the result is a JAX float32 array of shape (...).
  `allow_random_backbone=True` skips the AlexNet weights (random backbone): tests only.
  """

  def __init__(self, backbone_path=None, device=None, batch_size=512, allow_random_backbone=False):
    if 'tensorflow' in sys.modules and 'torchvision' not in sys.modules:
      # Importing torchvision after TensorFlow crashes the process (segfault) with our wheels.
      raise RuntimeError('LPIPS imports torchvision, which crashes after TensorFlow: create LPIPS (or import '
                         'torchvision) before importing TensorFlow')
    torch = import_order.import_torch()
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')
      lpips = import_order.import_lpips()
      if backbone_path is not None or not allow_random_backbone:
        backbone_path = check_lpips_available(backbone_path)
      # pretrained=False / pnet_rand=True: build without any download; weights are loaded below.
      model = lpips.LPIPS(pretrained=False, net='alex', version='0.1', pnet_rand=True, verbose=False)
    lin_path = os.path.join(os.path.dirname(lpips.__file__), 'weights', 'v0.1', 'alex.pth')
    lin_state = torch.load(lin_path, map_location='cpu', weights_only=True)
    expected = {f'lin{k}.model.1.weight' for k in range(5)}
    if not expected <= set(lin_state):
      missing = sorted(expected - set(lin_state))
      raise ValueError(f'{lin_path} lacks LPIPS linear layers {missing}: reinstall lpips')
    model.load_state_dict({k: lin_state[k] for k in expected}, strict=False)
    if backbone_path is not None:
      try:
        model.net.load_state_dict(_backbone_state_dict(backbone_path), strict=True)
      except RuntimeError as e:
        raise ValueError(f'{backbone_path} does not hold AlexNet weights ({str(e).splitlines()[0][:200]}): give '
                         f'torchvision\'s {ALEXNET_FILE} ({ALEXNET_URL})') from None
    if device is None:
      device = 'cuda' if torch.cuda.is_available() else 'cpu'
    self.device = torch.device(device)
    self.model = model.to(self.device).eval()
    self.batch_size = batch_size
    self.backbone_path = backbone_path

  def _to_torch(self, x):
    """(N, H, W, C) array in [0, 1] -> (N, 3, H, W) float32 torch tensor in [-1, 1] on the device."""
    torch = import_order.import_torch()
    try:
      tensor = torch.from_dlpack(x)
    except (TypeError, ValueError, RuntimeError, BufferError, AttributeError):
      tensor = torch.from_numpy(np.array(x, dtype=np.float32))
    tensor = tensor.to(self.device, torch.float32).permute(0, 3, 1, 2)
    if tensor.shape[1] == 1:
      tensor = tensor.expand(-1, 3, -1, -1)
    return 2. * tensor - 1.

  def features(self, frames):
    """LPIPS' unit-normalised AlexNet features of frames (..., H, W, C) in [0, 1], as a ``Features``.

    One side of a distance: a target scored against many predictions (the samples of best-of-N) has its
    features computed once and passed to ``__call__`` in place of the frames.
    """
    torch, lpips = import_order.import_torch(), import_order.import_lpips()
    lead, frame = frames.shape[:-3], frames.shape[-3:]
    flat = frames.reshape((-1,) + frame)
    layers = []
    with torch.inference_mode():
      for start in range(0, flat.shape[0], self.batch_size):
        outs = self.model.net(self.model.scaling_layer(self._to_torch(flat[start:start + self.batch_size])))
        layers.append([lpips.normalize_tensor(o) for o in outs])
    return Features(tuple(lead), tuple(frame), [torch.cat(per_layer) for per_layer in zip(*layers)])

  def __call__(self, pred, target):
    """LPIPS distance per frame between pred and target, (..., H, W, C) -> (...).

    ``target``: frames shaped as ``pred`` or as a suffix of it (broadcast over pred's leading axes), or
    their ``features``. The same computation as ``lpips.LPIPS.forward`` (distance(target, pred), as the
    official evaluation orders it), up to float rounding.
    """
    torch, lpips = import_order.import_torch(), import_order.import_lpips()
    if pred.ndim < 3 or pred.shape[-1] not in (1, 3):
      raise ValueError(f'expected frames shaped (..., H, W, C) with C in (1, 3), got {pred.shape}')
    if not isinstance(target, Features):
      if tuple(pred.shape[pred.ndim - target.ndim:]) != tuple(target.shape):
        raise ValueError(f'pred and target shapes differ: {pred.shape} vs {target.shape}')
      target = self.features(target)
    t_shape = target.lead + target.frame
    if tuple(pred.shape[pred.ndim - len(t_shape):]) != t_shape:
      raise ValueError(f'pred and target shapes differ: {pred.shape} vs {t_shape}')
    lead, frame = pred.shape[:-3], pred.shape[-3:]
    pred = pred.reshape((-1,) + frame)
    n_target = target.layers[0].shape[0]
    out = []
    with torch.inference_mode():
      for start in range(0, pred.shape[0], self.batch_size):
        p = self._to_torch(pred[start:start + self.batch_size])
        index = torch.arange(start, start + p.shape[0], device=self.device) % n_target
        outs = self.model.net(self.model.scaling_layer(p))
        value = 0
        for lin, t_feat, p_out in zip(self.model.lins, target.layers, outs):
          diff = (t_feat.index_select(0, index) - lpips.normalize_tensor(p_out)) ** 2
          value = value + lin(diff).mean([2, 3], keepdim=True)
        out.append(value.reshape(-1).cpu().numpy())
    values = np.concatenate(out) if out else np.zeros((0,), np.float32)
    return jnp.asarray(values.reshape(lead))


@dataclasses.dataclass
class Features:
  """``LPIPS.features`` of frames (lead + frame shape): per AlexNet layer, (N, C, h, w) unit-normalised."""
  lead: tuple
  frame: tuple
  layers: list
