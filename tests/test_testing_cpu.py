"""The test process's compile settings (dpft.testing.cpu): one-device programs at LLVM -O0, programs over
several devices optimised."""
import jax
from jax._src import compiler

from dpft.testing import cpu


def _level(num_replicas: int, num_partitions: int) -> int:
    options = compiler.get_compile_options(num_replicas, num_partitions)
    return options.executable_build_options.debug_options.xla_backend_optimization_level


def test_one_device_programs_compile_at_o0_and_multi_device_ones_optimised():
    cpu.fast_compile_one_device_programs()  # conftest installed it already: a second call changes nothing
    assert _level(1, 1) == 0
    assert _level(1, 8) > 0 and _level(8, 1) > 0 and _level(2, 4) > 0  # XLA's default (3), as XLA_FLAGS set none


def test_the_hook_reaches_the_programs_jax_compiles(monkeypatch):
    """jax builds every program's options through the wrapped function: a jitted one-device program and an
    8-device one ask for (1, 1) and (1, 8)."""
    seen = []
    hooked = compiler.get_compile_options

    def spy(num_replicas, num_partitions, *args, **kwargs):
        options = hooked(num_replicas, num_partitions, *args, **kwargs)
        seen.append((num_replicas * num_partitions,
                     options.executable_build_options.debug_options.xla_backend_optimization_level))
        return options

    monkeypatch.setattr(compiler, "get_compile_options", spy)
    jax.jit(lambda x: x * 3.0 + 1.0).lower(jax.numpy.ones(5)).compile()
    mesh = jax.make_mesh((len(jax.devices()),), ("d",))
    sharded = jax.device_put(jax.numpy.ones(len(jax.devices())),
                             jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d")))
    jax.jit(lambda x: x.sum() * 2.0 + 1.0).lower(sharded).compile()
    assert (1, 0) in seen and any(n == len(jax.devices()) > 1 and level > 0 for n, level in seen), seen
