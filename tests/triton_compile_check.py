"""Compile the Triton kernels for an H100 (sm_90, down to the cubin) on a machine
without a GPU, the way jax-triton does (arrays 16-byte aligned, Python ints as i32, the
meta-parameters as constexprs), and print each launch's shared memory as JSON.

Run in its own process: ``TRITON_INTERPRET`` must be unset when triton is imported.
Usage: python tests/triton_compile_check.py '[[batch, heads, kv_heads, head_dim,
page_size, max_blocks, dtype, block_tokens|null, num_warps, num_stages(, append(, head_major))], ...]'
(the decode kernel, or with append true the decode-append kernel) or python tests/triton_compile_check.py prefill '[[batch, T, heads,
kv_heads, head_dim, page_size, max_blocks, dtype, block_q|null, block_tokens|null,
num_warps, num_stages(, split_diagonal)], ...]' (the chunked-prefill kernel).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import jax.numpy as jnp
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from pallas_kernels.triton_chunked_prefill import prefill_launch
from pallas_kernels.triton_decode_kernel import paged_decode_append_kernel, paged_decode_kernel
from pallas_kernels.triton_fused_layer import (
    GATE_UP_BLOCK_K,
    MATMUL_BLOCK_K,
    QKV_BLOCK_K,
    block_rows,
    fitting_block_k,
    gate_up_launch,
    matmul_launch,
    qkv_launch,
)
from pallas_kernels.triton_layer_kernels import (
    matmul_residual_kernel,
    norm_gate_up_kernel,
    norm_qkv_rope_kernel,
)
from pallas_kernels.triton_paged_decode import decode_launch
from pallas_kernels.triton_prefill_kernel import paged_prefill_kernel

_TRITON_TYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
_ARRAYS = {"q_ptr": None, "k_ptr": None, "v_ptr": None, "qkv_ptr": None,
           "k_out_ptr": None, "v_out_ptr": None, "table_ptr": "i32",
           "length_ptr": "i32", "meta_ptr": "i32", "o_ptr": None, "m_ptr": "fp32",
           "den_ptr": "fp32"}


def _compile(kernel: Any, dtype: str, meta: dict[str, Any], num_warps: int,
             num_stages: int, o_dtype: str = "float32") -> Any:
    names = kernel.arg_names
    signature = {n: "*" + (_ARRAYS[n] or _TRITON_TYPES[dtype]) if n in _ARRAYS else "i32"
                 for n in names}
    signature["o_ptr"] = "*" + _TRITON_TYPES[o_dtype]
    signature.update({n: "constexpr" for n in meta})
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in _ARRAYS}
    return triton.compile(ASTSource(kernel, signature, constexprs=meta, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def shared_bytes(batch: int, heads: int, kv_heads: int, head_dim: int, page_size: int,
                 max_blocks: int, dtype: str, block_tokens: int | None, num_warps: int,
                 num_stages: int, append: bool = False,
                 head_major: bool = False) -> dict[str, int]:
    """Compile one launch for sm_90 (the append kernel with ``append``, head-major pages
    with ``head_major``); its shared memory and settings."""
    launch = decode_launch((batch, heads, head_dim), (batch * max_blocks, page_size,
                                                      kv_heads, head_dim),
                           max_blocks, jnp.dtype(dtype), layer=None,
                           block_tokens=block_tokens, num_splits=None,
                           num_warps=num_warps, num_stages=num_stages, head_major=head_major)
    meta = dict(launch.meta)
    o_dtype = dtype if launch.grid[2] == 1 else "float32"  # one split: normalised output
    kernel = paged_decode_append_kernel if append else paged_decode_kernel
    compiled = _compile(kernel, dtype, meta, launch.num_warps, launch.num_stages, o_dtype)
    return {"shared": int(compiled.metadata.shared), "block_tokens": int(meta["BLOCK_TOKENS"])}


def prefill_shared_bytes(batch: int, t: int, heads: int, kv_heads: int, head_dim: int,
                         page_size: int, max_blocks: int, dtype: str, block_q: int | None,
                         block_tokens: int | None, num_warps: int | None,
                         num_stages: int, split_diagonal: bool = True) -> dict[str, int]:
    """Compile one chunked-prefill launch for sm_90; its shared memory and tiles."""
    launch = prefill_launch((batch, t, heads, head_dim),
                            (batch * max_blocks, page_size, kv_heads, head_dim), max_blocks,
                            jnp.dtype(dtype), layer=None, block_q=block_q,
                            block_tokens=block_tokens, num_warps=num_warps,
                            num_stages=num_stages, split_diagonal=split_diagonal)
    meta = dict(launch.meta)
    compiled = _compile(paged_prefill_kernel, dtype, meta, launch.num_warps, launch.num_stages)
    return {"shared": int(compiled.metadata.shared), "block_q": int(meta["BLOCK_Q"]),
            "block_tokens": int(meta["BLOCK_TOKENS"])}


def layer_shared_bytes(batch: int, hidden: int, heads: int, kv_heads: int, head_dim: int,
                       inter: int, dtype: str) -> dict[str, int]:
    """Compile the three fused-layer programs at one decode shape (default launch
    settings, and the q/k/v and matmul programs with split-K) for sm_90; the shared
    memory of each."""
    dt = jnp.dtype(dtype)
    w = _TRITON_TYPES[dtype]
    launches = {
        "norm_qkv_rope": (norm_qkv_rope_kernel, qkv_launch(
            batch, hidden, heads, kv_heads, head_dim, dt, has_bias=True, eps=1e-6,
            block_k=fitting_block_k(QKV_BLOCK_K, block_rows(batch), head_dim, dt, 4))[1],
            {"cos_ptr": "fp32", "sin_ptr": "fp32"}, 4, 4),
        "norm_qkv_rope_split": (norm_qkv_rope_kernel, qkv_launch(
            batch, hidden, heads, kv_heads, head_dim, dt, has_bias=True, eps=1e-6,
            block_k=128, split_k=4)[1], {"cos_ptr": "fp32", "sin_ptr": "fp32",
                                         "out_ptr": "fp32"}, 4, 4),
        "matmul_residual": (matmul_residual_kernel, matmul_launch(
            batch, inter, hidden, dt, has_bias=False, block_n=32,
            block_k=fitting_block_k(MATMUL_BLOCK_K, block_rows(batch), 32, dt, 3))[1], {}, 3, 4),
        "matmul_residual_split": (matmul_residual_kernel, matmul_launch(
            batch, inter, hidden, dt, has_bias=False, block_n=32, block_k=128,
            split_k=4)[1], {"out_ptr": "fp32"}, 4, 4),
        "norm_gate_up": (norm_gate_up_kernel, gate_up_launch(
            batch, hidden, inter, dt, eps=1e-6, block_n=64,
            block_k=fitting_block_k(GATE_UP_BLOCK_K, block_rows(batch), 128, dt, 4))[1], {}, 4,
            8),
    }
    out = {}
    for name, (kernel, meta, f32_arrays, stages, warps) in launches.items():
        signature = {n: "constexpr" if n in meta else "*" + f32_arrays.get(n, w)
                     for n in kernel.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names)
                 if n not in meta}
        compiled = triton.compile(ASTSource(kernel, signature, constexprs=meta, attrs=attrs),
                                  target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": warps, "num_stages": stages})
        out[name] = int(compiled.metadata.shared)
    return out


if __name__ == "__main__":
    if sys.argv[1] == "layer":
        print(json.dumps([layer_shared_bytes(*c) for c in json.loads(sys.argv[2])]))
    elif sys.argv[1] == "prefill":
        print(json.dumps([prefill_shared_bytes(*c) for c in json.loads(sys.argv[2])]))
    else:
        print(json.dumps([shared_bytes(*config) for config in json.loads(sys.argv[1])]))
