"""crossmap.cli with Gemma's GELU computed in float32 after the gate product (a probe of one MLP change)."""
import sys
import jax
import jax.numpy as jnp
from crossmap.models import layers


def mlp_call(self, x):
    impl = self.int8_implementation
    gate = layers.project(x, self.gate, self.gate_scale, "", 1, implementation=impl)
    if self.activation == "silu":
        act = jax.nn.silu(gate)
    else:
        act = jax.nn.gelu(gate.astype(jnp.float32), approximate=True).astype(gate.dtype)
    up = layers.project(x, self.up, self.up_scale, "", 1, implementation=impl)
    return layers.project(act * up, self.down, self.down_scale, "", 1, implementation=impl)


layers.MLP.__call__ = mlp_call
from crossmap.cli import main  # noqa: E402
sys.exit(main(sys.argv[1:]))
