"""FLOPs counted from the jaxpr: closed forms, and scan bodies counted once per layer."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from vim_jax import flops
from vim_jax.models import transformer


def test_matmul_and_convolution_closed_forms():
  a, b = jnp.zeros((3, 5, 7)), jnp.zeros((3, 7, 11))
  assert flops.step_flops(lambda a, b: jnp.einsum("bik,bkj->bij", a, b), a, b) == 2 * 3 * 5 * 7 * 11
  x, kernel = jnp.zeros((2, 8, 8, 4)), jnp.zeros((3, 3, 4, 6))
  conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  assert flops.step_flops(conv, x, kernel) == 2 * (2 * 8 * 8 * 6) * (3 * 3 * 4)
  # The gradient w.r.t. a: the forward matmul and one more; a scan of 4 matmuls counts 4.
  grad = jax.grad(lambda a, b: jnp.sum(jnp.einsum("bik,bkj->bij", a, b)))
  assert flops.step_flops(grad, a, b) == 2 * (2 * 3 * 5 * 7 * 11)
  scan = lambda a, b: jax.lax.scan(lambda c, _: (c, jnp.einsum("bik,bkj->bij", c, b)), a,
                                   None, length=4)[1]
  assert flops.step_flops(scan, a, b) == 4 * 2 * 3 * 5 * 7 * 11


def test_a_scanned_stack_counts_every_layer():
  """A scanned stack counts what the unrolled one counts (XLA's cost analysis counts one
  layer): the forward in closed form, the backward twice the forward, and rematerialisation
  its recomputed forward (less the last matmul, whose output no gradient needs)."""
  config = transformer.StackConfig(num_layers=4, width=32, num_heads=2, head_dim=16,
                                   mlp_dim=64, causal=True)
  x = jnp.zeros((2, 8, 32))
  tokens = 2 * 8
  linear = 2 * tokens * (3 * 32 * 32 + 32 * 32 + 2 * 32 * 64)  # q, k, v, out; fc1, fc2
  attention = 2 * 2 * (2 * 2 * 8 * 8 * 16)  # q.k and p.v, for batch 2 x 2 heads
  forward = 4 * (linear + attention)

  def counted(cfg, train):
    model = transformer.Transformer(cfg)
    params = nn.meta.unbox(model.init(jax.random.key(0), x))
    fn = (jax.grad(lambda p: jnp.sum(model.apply(p, x))) if train else
          lambda p: model.apply(p, x))
    return flops.step_flops(fn, params)

  for policy, expected in (("none", 3 * forward),
                           ("full", 3 * forward + 4 * (linear + attention - 2 * tokens * 64 * 32))):
    cfg = dataclasses.replace(config, remat_policy=policy)
    assert counted(cfg, train=False) == forward
    assert counted(cfg, train=True) == expected, policy
    assert counted(dataclasses.replace(cfg, scan_layers=True), train=True) == expected, policy


def test_a_jitted_step_traced_before_counts_its_fused_attention():
  """compile_step counts a step jit has already traced with splash (interpret mode here): the
  count is XLA attention's two matmuls, not the uncountable kernel's."""
  from vim_jax import train_lib
  from vim_jax.models import attention
  q = jnp.zeros((1, 128, 2, 64))
  fn = lambda q: attention.dot_product_attention(q, q, q, causal=False,
                                                 implementation="splash", block=128)
  with attention.pallas_interpret():
    jitted = jax.jit(fn)
    _, counted = train_lib.compile_step(jitted, q)
  assert counted == 2 * (2 * 1 * 2 * 128 * 128 * 64)


def test_compile_step_counts_from_its_own_trace_unless_a_kernel_hides_matmuls():
  """XLA attention: the count comes from the trace jit compiles (no second trace) and equals a
  fresh count; splash: the trace is seen to hold an opaque kernel."""
  from vim_jax import train_lib
  from vim_jax.models import attention
  q = jnp.zeros((1, 128, 2, 64))
  make = lambda kind: (lambda q: attention.dot_product_attention(
      q, q, q, causal=True, implementation=kind, block=128))
  _, counted = train_lib.compile_step(jax.jit(make("xla")), q)
  assert counted == flops.step_flops(make("xla"), q) == 2 * (2 * 1 * 2 * 128 * 128 * 64)
  assert not flops.holds_opaque_kernels(jax.make_jaxpr(make("xla"))(q).jaxpr)
  with attention.pallas_interpret():
    assert flops.holds_opaque_kernels(jax.make_jaxpr(make("splash"))(q).jaxpr)
