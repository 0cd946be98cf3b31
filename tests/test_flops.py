"""FLOPs counted from the jaxpr: closed forms, and scan bodies counted once per layer."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
import stacks

from vim_jax.infra import flops
from vim_jax.models import transformer


def test_matmul_and_convolution_closed_forms():
  a, b = jnp.zeros((3, 5, 7)), jnp.zeros((3, 7, 11))
  assert flops.step_flops(lambda a, b: jnp.einsum("bik,bkj->bij", a, b), a, b) == 2 * 3 * 5 * 7 * 11
  x, kernel = jnp.zeros((2, 8, 8, 4)), jnp.zeros((3, 3, 4, 6))
  conv = lambda x, k: jax.lax.conv_general_dilated(
      x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  assert flops.step_flops(conv, x, kernel) == 2 * (2 * 8 * 8 * 6) * (3 * 3 * 4)
  # The gradient w.r.t. a: the forward matmul and one more; a scan of 4 matmuls counts 4.
  grad = jax.grad(lambda a, b: jnp.sum(jnp.einsum("bik,bkj->bij", a, b)))
  assert flops.step_flops(grad, a, b) == 2 * (2 * 3 * 5 * 7 * 11)
  scan = lambda a, b: jax.lax.scan(
      lambda c, _: (c, jnp.einsum("bik,bkj->bij", c, b)), a, None, length=4
  )[1]
  assert flops.step_flops(scan, a, b) == 4 * 2 * 3 * 5 * 7 * 11


def test_a_scanned_stack_counts_every_layer():
  """A scanned stack counts what the unrolled one counts (XLA's cost analysis counts one
  layer): the forward in closed form with causal attention at half, the backward twice the
  forward. Rematerialisation adds its recomputed forward (less the last matmul, whose output
  no gradient needs) to the hardware FLOPs only: the model FLOPs are the same for every
  policy."""
  config = stacks.stack(num_layers=4, width=32, num_heads=2, head_dim=16, mlp_dim=64, causal=True)
  x = jnp.zeros((2, 8, 32))
  tokens = 2 * 8
  linear = 2 * tokens * (3 * 32 * 32 + 32 * 32 + 2 * 32 * 64)  # q, k, v, out; fc1, fc2
  attention = 0.5 * 2 * 2 * (2 * 2 * 8 * 8 * 16)  # q.k and p.v, batch 2 x 2 heads, causal
  forward = 4 * (linear + attention)

  def counted(cfg, train):
    model = transformer.Transformer(cfg)
    params = nn.meta.unbox(model.init(jax.random.key(0), x))
    fn = jax.grad(lambda p: jnp.sum(model.apply(p, x))) if train else lambda p: model.apply(p, x)
    return flops.count_step(fn, params)

  recompute = {"none": 0, "full": 4 * (linear + attention - 2 * tokens * 64 * 32)}
  for policy, extra in recompute.items():
    cfg = dataclasses.replace(config, remat_policy=policy)
    assert counted(cfg, train=False) == flops.StepFlops(forward, forward)
    expected = flops.StepFlops(3 * forward, 3 * forward + extra)
    assert counted(cfg, train=True) == expected, policy
    assert counted(dataclasses.replace(cfg, scan_layers=True), train=True) == expected, policy
  minimal = counted(dataclasses.replace(config, remat_policy="minimal"), train=True)
  assert minimal.model == 3 * forward and 3 * forward < minimal.hardware < 3 * forward + extra


def test_vim_training_flops_are_the_literature_closed_form():
  """VIM's loss and gradient: model FLOPs = 6 x tokens x (matmul params) + 3 x the causal
  attention's forward, 2 x L x B x T^2 x H x K (half of q.k and p.v: MaxText's count);
  the same for every remat policy. Hardware FLOPs add the recompute: with remat off, only the
  loss head's chunked forward (2 x tokens x width x vocab)."""

  layers, width, heads, head_dim, mlp, vocab, length, batch = 3, 32, 2, 16, 64, 48, 16, 4
  for policy in ("none", "minimal", "full"):
    stack = stacks.stack(
        num_layers=layers,
        width=width,
        num_heads=heads,
        head_dim=head_dim,
        mlp_dim=mlp,
        causal=True,
        remat_policy=policy,
        scan_layers=True,
    )
    model = stacks.vim(
        stack=stack, vocab_size=vocab, num_tokens=length, num_classes=3, loss_chunk=8
    )
    tokens, labels = jnp.zeros((batch, length), jnp.int32), jnp.zeros((batch,), jnp.int32)
    params = nn.meta.unbox(model.init(jax.random.key(0), tokens, labels))["params"]
    kernels = sum(
        leaf.size
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
        if str(getattr(path[-1], "key", "")).endswith("kernel")
    )
    assert kernels == layers * (4 * width * heads * head_dim + 2 * width * mlp) + width * vocab
    loss = lambda p: jnp.sum(model.apply({"params": p}, tokens, labels, method=model.loss)[0])
    counted = flops.count_step(jax.grad(loss), params)
    model_flops = (
        6 * batch * length * kernels + 3 * layers * batch * 2 * length**2 * heads * head_dim
    )
    assert counted.model == model_flops, policy
    if policy == "none":
      assert counted.hardware == model_flops + 2 * batch * length * width * vocab
    else:
      assert counted.hardware > model_flops + 2 * batch * length * width * vocab, policy


def test_a_periodic_step_counts_at_its_frequency_and_utilisation_divides_by_the_peak():
  """Lazy R1 every 4 steps: the mean is (3 regular + 1 R1) / 4; Progress's MFU and HFU are
  model and hardware FLOP/s over the device's peak, and absent without a known peak."""
  import time

  from vim_jax.infra import progress_log

  regular, periodic = flops.StepFlops(8.0, 10.0), flops.StepFlops(12.0, 18.0)
  assert flops.mean_over_cycle(regular, periodic, 4) == flops.StepFlops(9.0, 12.0)
  progress = progress_log.Progress(0, 100, 8, flops.StepFlops(3e12, 4e12), 1, peak_flops=100e12)
  progress.last_time = time.perf_counter() - 10.0  # 10 steps in ~10 s
  out = progress.update(10)
  assert out["mfu"] == pytest.approx(out["steps_per_sec"] * 3e12 / 100e12)
  assert out["hfu"] / out["mfu"] == pytest.approx(4 / 3)
  assert out["tflops_per_sec_per_device"] == pytest.approx(out["steps_per_sec"] * 3)
  assert "mfu" not in progress_log.Progress(0, 100, 8, regular, 1).update(1)


def test_peak_flops_by_device_kind():
  from types import SimpleNamespace as Device

  assert flops.peak_flops_per_second(Device(platform="tpu", device_kind="TPU v4")) == 275e12
  assert flops.peak_flops_per_second(Device(platform="tpu", device_kind="TPU v5 lite")) == 197e12
  assert flops.peak_flops_per_second(Device(platform="gpu", device_kind="NVIDIA H200")) == 989e12
  assert (
      flops.peak_flops_per_second(Device(platform="gpu", device_kind="NVIDIA H100 80GB HBM3"))
      == 989e12
  )
  assert flops.peak_flops_per_second(Device(platform="cpu", device_kind="cpu")) is None


def test_a_jitted_step_traced_before_counts_its_fused_attention():
  """compile_step counts a step jit has already traced with splash (interpret mode here): the
  count is XLA attention's two matmuls, not the uncountable kernel's."""
  from vim_jax.models import attention
  from vim_jax.trainers import compiling

  q = jnp.zeros((1, 128, 2, 64))
  fn = lambda q: attention.dot_product_attention(
      q, q, q, causal=False, implementation="splash", block=128
  )
  with attention.pallas_interpret():
    jitted = jax.jit(fn)
    _, counted = compiling.compile_step(jitted, q)
  assert counted == flops.StepFlops(*2 * [2 * (2 * 1 * 2 * 128 * 128 * 64)])


def test_compile_step_counts_from_its_own_trace_unless_a_kernel_hides_matmuls():
  """XLA attention: the count comes from the trace jit compiles (no second trace) and equals a
  fresh count; splash: the trace is seen to hold an opaque kernel."""
  from vim_jax.models import attention
  from vim_jax.trainers import compiling

  q = jnp.zeros((1, 128, 2, 64))
  make = lambda kind: (
      lambda q: attention.dot_product_attention(
          q, q, q, causal=True, implementation=kind, block=128
      )
  )
  _, counted = compiling.compile_step(jax.jit(make("xla")), q)
  causal = 0.5 * 2 * (2 * 1 * 2 * 128 * 128 * 64)  # the masked half is not counted
  assert counted == flops.count_step(make("xla"), q) == flops.StepFlops(causal, causal)
  assert not flops.holds_opaque_kernels(jax.make_jaxpr(make("xla"))(q).jaxpr)
  with attention.pallas_interpret():
    assert flops.holds_opaque_kernels(jax.make_jaxpr(make("splash"))(q).jaxpr)
