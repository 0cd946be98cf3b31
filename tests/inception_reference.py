"""An independent PyTorch FID InceptionV3 (pytorch-fid's network, functional) for the tests.

Written from pytorch-fid's description of the network (torchvision's Inception3 with
FIDInceptionA/C/E_1/E_2), in NCHW with torch.nn.functional. It creates random weights under the
published key names as it runs, so the .pth file saved from it has exactly
pt_inception-2015-12-05's layout.
"""

import torch

F = torch.nn.functional


class TorchFIDInception:
  """pytorch-fid's fid_inception_v3 forward, functional, with lazily created random weights."""

  def __init__(self, seed: int = 0):
    self.state: dict[str, "torch.Tensor"] = {}
    self.gen = torch.Generator().manual_seed(seed)

  def _randn(self, *shape):
    return torch.randn(*shape, generator=self.gen, dtype=torch.float64)

  def _rand(self, *shape):
    return torch.rand(*shape, generator=self.gen, dtype=torch.float64)

  def conv(self, x, name, out, kernel, stride=1, padding=(0, 0)):
    kh, kw = kernel
    s = self.state
    if f"{name}.conv.weight" not in s:
      fan_in = x.shape[1] * kh * kw
      s[f"{name}.conv.weight"] = self._randn(out, x.shape[1], kh, kw) * (2 / fan_in) ** 0.5
      s[f"{name}.bn.weight"] = 0.5 + self._rand(out)
      s[f"{name}.bn.bias"] = 0.1 * self._randn(out)
      s[f"{name}.bn.running_mean"] = 0.1 * self._randn(out)
      s[f"{name}.bn.running_var"] = 0.5 + self._rand(out)
      s[f"{name}.bn.num_batches_tracked"] = torch.tensor(0)
    x = F.conv2d(x, s[f"{name}.conv.weight"], stride=stride, padding=padding)
    x = F.batch_norm(
        x,
        s[f"{name}.bn.running_mean"],
        s[f"{name}.bn.running_var"],
        s[f"{name}.bn.weight"],
        s[f"{name}.bn.bias"],
        training=False,
        eps=0.001,
    )
    return F.relu(x)

  def block_a(self, x, n, pool_features):
    b1 = self.conv(x, f"{n}.branch1x1", 64, (1, 1))
    b5 = self.conv(
        self.conv(x, f"{n}.branch5x5_1", 48, (1, 1)), f"{n}.branch5x5_2", 64, (5, 5), padding=(2, 2)
    )
    b3 = self.conv(x, f"{n}.branch3x3dbl_1", 64, (1, 1))
    b3 = self.conv(b3, f"{n}.branch3x3dbl_2", 96, (3, 3), padding=(1, 1))
    b3 = self.conv(b3, f"{n}.branch3x3dbl_3", 96, (3, 3), padding=(1, 1))
    bp = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    bp = self.conv(bp, f"{n}.branch_pool", pool_features, (1, 1))
    return torch.cat([b1, b5, b3, bp], 1)

  def block_b(self, x, n):
    b3 = self.conv(x, f"{n}.branch3x3", 384, (3, 3), stride=2)
    bd = self.conv(x, f"{n}.branch3x3dbl_1", 64, (1, 1))
    bd = self.conv(bd, f"{n}.branch3x3dbl_2", 96, (3, 3), padding=(1, 1))
    bd = self.conv(bd, f"{n}.branch3x3dbl_3", 96, (3, 3), stride=2)
    return torch.cat([b3, bd, F.max_pool2d(x, 3, stride=2)], 1)

  def block_c(self, x, n, c7):
    b1 = self.conv(x, f"{n}.branch1x1", 192, (1, 1))
    b7 = self.conv(x, f"{n}.branch7x7_1", c7, (1, 1))
    b7 = self.conv(b7, f"{n}.branch7x7_2", c7, (1, 7), padding=(0, 3))
    b7 = self.conv(b7, f"{n}.branch7x7_3", 192, (7, 1), padding=(3, 0))
    bd = self.conv(x, f"{n}.branch7x7dbl_1", c7, (1, 1))
    bd = self.conv(bd, f"{n}.branch7x7dbl_2", c7, (7, 1), padding=(3, 0))
    bd = self.conv(bd, f"{n}.branch7x7dbl_3", c7, (1, 7), padding=(0, 3))
    bd = self.conv(bd, f"{n}.branch7x7dbl_4", c7, (7, 1), padding=(3, 0))
    bd = self.conv(bd, f"{n}.branch7x7dbl_5", 192, (1, 7), padding=(0, 3))
    bp = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    bp = self.conv(bp, f"{n}.branch_pool", 192, (1, 1))
    return torch.cat([b1, b7, bd, bp], 1)

  def block_d(self, x, n):
    b3 = self.conv(
        self.conv(x, f"{n}.branch3x3_1", 192, (1, 1)), f"{n}.branch3x3_2", 320, (3, 3), stride=2
    )
    b7 = self.conv(x, f"{n}.branch7x7x3_1", 192, (1, 1))
    b7 = self.conv(b7, f"{n}.branch7x7x3_2", 192, (1, 7), padding=(0, 3))
    b7 = self.conv(b7, f"{n}.branch7x7x3_3", 192, (7, 1), padding=(3, 0))
    b7 = self.conv(b7, f"{n}.branch7x7x3_4", 192, (3, 3), stride=2)
    return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)

  def block_e(self, x, n, max_pool):
    b1 = self.conv(x, f"{n}.branch1x1", 320, (1, 1))
    b3 = self.conv(x, f"{n}.branch3x3_1", 384, (1, 1))
    b3 = torch.cat(
        [
            self.conv(b3, f"{n}.branch3x3_2a", 384, (1, 3), padding=(0, 1)),
            self.conv(b3, f"{n}.branch3x3_2b", 384, (3, 1), padding=(1, 0)),
        ],
        1,
    )
    bd = self.conv(x, f"{n}.branch3x3dbl_1", 448, (1, 1))
    bd = self.conv(bd, f"{n}.branch3x3dbl_2", 384, (3, 3), padding=(1, 1))
    bd = torch.cat(
        [
            self.conv(bd, f"{n}.branch3x3dbl_3a", 384, (1, 3), padding=(0, 1)),
            self.conv(bd, f"{n}.branch3x3dbl_3b", 384, (3, 1), padding=(1, 0)),
        ],
        1,
    )
    if max_pool:  # FIDInceptionE_2
      bp = F.max_pool2d(x, 3, stride=1, padding=1)
    else:  # FIDInceptionE_1
      bp = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    bp = self.conv(bp, f"{n}.branch_pool", 192, (1, 1))
    return torch.cat([b1, b3, bd, bp], 1)

  def __call__(self, images01):
    """images [B, 3, H, W] in [0, 1] -> (pool [B, 2048], unbiased logits [B, 1008], logits
    [B, 1008]). The Inception Score uses the unbiased ones, pool @ W without the fc bias, as
    improved-GAN's code (`softmax/logits/MatMul`) and torch-fidelity (`logits_unbiased`) do."""
    x = F.interpolate(images01, size=(299, 299), mode="bilinear", align_corners=False)
    x = 2 * x - 1
    x = self.conv(x, "Conv2d_1a_3x3", 32, (3, 3), stride=2)
    x = self.conv(x, "Conv2d_2a_3x3", 32, (3, 3))
    x = self.conv(x, "Conv2d_2b_3x3", 64, (3, 3), padding=(1, 1))
    x = F.max_pool2d(x, 3, stride=2)
    x = self.conv(x, "Conv2d_3b_1x1", 80, (1, 1))
    x = self.conv(x, "Conv2d_4a_3x3", 192, (3, 3))
    x = F.max_pool2d(x, 3, stride=2)
    x = self.block_a(x, "Mixed_5b", 32)
    x = self.block_a(x, "Mixed_5c", 64)
    x = self.block_a(x, "Mixed_5d", 64)
    x = self.block_b(x, "Mixed_6a")
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = self.block_c(x, name, c7)
    x = self.block_d(x, "Mixed_7a")
    x = self.block_e(x, "Mixed_7b", max_pool=False)
    x = self.block_e(x, "Mixed_7c", max_pool=True)
    pool = F.adaptive_avg_pool2d(x, 1).flatten(1)
    if "fc.weight" not in self.state:
      self.state["fc.weight"] = self._randn(1008, 2048) / 2048**0.5
      self.state["fc.bias"] = 0.1 * self._randn(1008)
    unbiased = F.linear(pool, self.state["fc.weight"])
    return pool, unbiased, unbiased + self.state["fc.bias"]


def write_random_pth(path, seed=0):
  """A random-weight file in pt_inception-2015-12-05's layout; returns the reference net."""
  ref = TorchFIDInception(seed)
  with torch.no_grad():
    ref(torch.zeros(1, 3, 299, 299, dtype=torch.float64))
  torch.save({k: (v.float() if v.is_floating_point() else v) for k, v in ref.state.items()}, path)
  return ref
