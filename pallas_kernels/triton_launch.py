"""How the Triton kernels launch from JAX: as XLA's own Triton custom call (default) or
through jax-triton.

jax-triton launches a kernel through a host custom call (``triton_kernel_call``), which
XLA does not put into a command buffer (CUDA graph): every launch is dispatched from
the host. In a chain of short kernels on an H100 that left ~11 us between launches
(3.8 us kernels, 14.9 us apart); the same kernel as XLA's Triton custom call ran back to
back (3.9 us kernels, 3.75 us apart) with bit-identical output (docs/serving-engine.md).
``xla_triton_call`` hands XLA the kernel's Triton IR (``__gpu$xla.gpu.triton``, as
Pallas's Triton lowering did), so XLA compiles it with its own Triton and captures it
with the rest of the program; it needs ``triton`` but not ``jax_triton``.

``triton_call`` dispatches on ``KVJAX_TRITON_LAUNCH`` ("xla", the default, or
"jax-triton"), read when a program is traced. On an H100 the XLA route ran the engine's
whole decode step 10-18% faster than jax-triton (the default step and the fused one,
docs/serving-engine.md), after inlining each kernel's helper functions before XLA sees
the IR (XLA adds a dependent-launch wait at the start of every function, which a
reduction's combiner cannot hold). Its output over the whole step agreed with the XLA
forward on an H100 (``benchmarks/check_fused_decode.py --reference-attention xla``):
float32 at batch 8 and 32 with greedy agreement 1.000 and logits within 1.2e-2;
bfloat16 logits within 0.15 (of 3.25), the same error as the jax-triton launch's.
jax-triton stays selectable (``KVJAX_TRITON_LAUNCH=jax-triton``); the CPU tests run the
kernels through it on Triton's interpreter. Both keep jax-triton's calling convention:
arrays and scalars in order, then the outputs, then the ``tl.constexpr`` meta-parameters
by name.
``xla_triton_call`` generates the IR with the installed ``triton`` (for sm_90) and turns
scalar arguments into constexprs. GPU only.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

LAUNCHERS = ("jax-triton", "xla")
LAUNCH_ENV = "KVJAX_TRITON_LAUNCH"
_TRITON_TYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "int32": "i32",
                 "uint32": "u32", "int64": "i64"}


@functools.lru_cache(maxsize=256)
def triton_ir(kernel: Any, pointer_types: tuple[str, ...], meta: tuple[tuple[str, Any], ...],
              num_warps: int, num_stages: int) -> tuple[str, str]:
    """The kernel's Triton IR (text) and its function name: pointer arguments of the given
    Triton element types (16-byte aligned), ``meta`` as constexprs."""
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend

    constexprs = dict(meta)
    names = [n for n in kernel.arg_names if n not in constexprs]
    if len(names) != len(pointer_types):
        raise ValueError(f"{kernel.__name__} takes {len(names)} arrays ({names}), got "
                         f"{len(pointer_types)}")
    types = dict(zip(names, pointer_types, strict=True))
    signature = {n: "constexpr" if n in constexprs else "*" + types[n]
                 for n in kernel.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names)
             if n not in constexprs}
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    options = backend.parse_options({"num_warps": num_warps, "num_stages": num_stages})
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs).make_ir(
        target, options, backend.get_codegen_implementation(options),
        backend.get_module_map(), context)
    # Triton's own first stage: inline the helper functions (a reduction's combiner
    # among them) so that XLA receives one function; XLA adds a dependent-launch wait
    # at the start of every function, which a combiner inlined later cannot hold.
    module = backend.make_ttir(module, {}, options, target.arch)
    text = str(module)
    found = re.search(r"tt\.func public @([\w$.]+)", text)
    if found is None:
        raise ValueError(f"no public function in the Triton IR of {kernel.__name__}")
    return text, found.group(1)


def xla_triton_call(*args: jax.Array | int | float | bool, kernel: Any,
                    out_shape: jax.ShapeDtypeStruct | list[jax.ShapeDtypeStruct],
                    grid: tuple[int, ...], num_warps: int = 4, num_stages: int = 3,
                    name: str = "", input_output_aliases: dict[int, int] | None = None,
                    **meta: Any) -> jax.Array | list[jax.Array]:
    """Launch ``kernel`` on ``grid`` as an XLA Triton custom call (jax-triton's
    ``triton_call`` arguments). Python scalars among the arguments become constexprs of
    their parameter (one compiled kernel per value). ``input_output_aliases`` indexes
    the array arguments. One output shape gives one array."""
    del name
    meta = dict(meta)
    arrays: list[jax.Array] = []
    for arg_name, a in zip(kernel.arg_names, args, strict=False):
        if isinstance(a, bool | int | float):
            meta[arg_name] = a
        else:
            arrays.append(a)
    single = isinstance(out_shape, jax.ShapeDtypeStruct)
    outs = [out_shape] if isinstance(out_shape, jax.ShapeDtypeStruct) else list(out_shape)
    dtypes = [x.dtype for x in arrays] + [o.dtype for o in outs]
    types = tuple(_TRITON_TYPES[jnp.dtype(d).name] for d in dtypes)
    text, fn_name = triton_ir(kernel, types, tuple(sorted(meta.items())), num_warps, num_stages)
    gx, gy, gz = (*grid, 1, 1)[:3]
    call = jax.ffi.ffi_call(
        "__gpu$xla.gpu.triton", outs[0] if single else outs,
        input_output_aliases=input_output_aliases or {}, custom_call_api_version=4)
    result = call(*arrays, name=fn_name, ir=text, num_stages=np.int32(num_stages),
                  num_warps=np.int32(num_warps), grid_x=np.int32(gx), grid_y=np.int32(gy),
                  grid_z=np.int32(gz), debug=False)
    return result if isinstance(result, jax.Array) else list(result)


def triton_launcher() -> str:
    """The launcher ``KVJAX_TRITON_LAUNCH`` selects ("xla" when unset).

    Raises:
      ValueError: on a value not in ``LAUNCHERS``.
    """
    name = os.environ.get(LAUNCH_ENV, "xla")
    if name not in LAUNCHERS:
        raise ValueError(f"{LAUNCH_ENV} must be one of {LAUNCHERS}, got {name!r}")
    return name


def triton_call(*args: Any, **kwargs: Any) -> Any:
    """Launch a Triton kernel with the selected launcher (jax-triton's arguments)."""
    if triton_launcher() == "jax-triton":
        from jax_triton import triton_call as jax_triton_call

        return jax_triton_call(*args, **kwargs)
    return xla_triton_call(*args, **kwargs)
