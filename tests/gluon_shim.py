"""Run a Gluon kernel's own source on the CPU, one program at a time, on torch tensors.

Gluon does not run under ``TRITON_INTERPRET``. This shim executes the Python source of a
``gluon.jit`` kernel (and of the ``gluon.jit`` helpers it calls) with the language replaced
by torch operations: layouts are ignored (they do not change values), ``convert_layout`` is
the identity, ``mma_v2`` a float32 matmul of its float16 operands, shared memory a tensor
written by the asynchronous copies at once, and inline PTX the magic-number unpack of
``kernels.common.plane_asm`` (emulated bit by bit). Pointers are (storage, byte offset,
element type) triples, so loads and stores reach the same memory as the launch arguments.

What this checks is the kernel's index arithmetic, masks, splits and softmax bookkeeping;
what it cannot check (lane layouts, the asynchronous copy pipeline) is for the GPU tests.
"""

from __future__ import annotations

import re
import types

import torch

from kivi_vllm.kernels.common import plane_asm


class PointerType:
    def __init__(self, element_ty: torch.dtype):
        self.element_ty = element_ty


class Ptr:
    """Pointer(s) into a byte storage: ``off`` is a byte offset (int or int64 tensor)."""

    def __init__(self, buf: torch.Tensor, off, element_ty: torch.dtype):
        self.buf, self.off, self.element_ty = buf, off, element_ty

    @classmethod
    def of(cls, t: torch.Tensor) -> Ptr:
        buf = torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage())
        return cls(buf, t.storage_offset() * t.element_size(), t.dtype)

    @property
    def dtype(self) -> PointerType:
        return PointerType(self.element_ty)

    def _size(self) -> int:
        return torch.empty(0, dtype=self.element_ty).element_size()

    def __add__(self, n) -> Ptr:
        if isinstance(n, torch.Tensor):
            n = n.to(torch.int64)
        return Ptr(self.buf, self.off + n * self._size(), self.element_ty)

    __radd__ = __add__

    def __getitem__(self, index) -> Ptr:
        return Ptr(self.buf, torch.as_tensor(self.off)[index], self.element_ty)

    def to(self, ty: PointerType) -> Ptr:
        return Ptr(self.buf, self.off, ty.element_ty)

    def view(self) -> torch.Tensor:
        n = self.buf.numel() // self._size() * self._size()
        return self.buf[:n].view(self.element_ty)

    def index(self) -> torch.Tensor:
        off = torch.as_tensor(self.off, dtype=torch.int64)
        assert bool((off % self._size() == 0).all()), "misaligned access"
        return off // self._size()


def load(ptr: Ptr, mask=None, other=None, **_):
    idx = ptr.index()
    if mask is not None:
        mask = torch.as_tensor(mask)
        idx, mask = torch.broadcast_tensors(idx, mask)
        idx = torch.where(mask, idx, 0)
    val = ptr.view()[idx]
    if mask is not None:
        val = torch.where(mask, val, torch.tensor(other or 0, dtype=val.dtype))
    return val


def store(ptr: Ptr, value, mask=None):
    assert mask is None
    idx = ptr.index()
    value = torch.as_tensor(value).to(ptr.element_ty)
    idx, value = torch.broadcast_tensors(idx, value)
    ptr.view()[idx.reshape(-1)] = value.reshape(-1)


def inline_asm_elementwise(asm, constraints, args, dtype, is_pure, pack):
    """``plane_asm``'s unpack: the masked byte under a float16 exponent, minus 2**k where
    the asm subtracts it; then ``code * s + m`` in one rounding (float32 here) where the asm
    has the fma."""
    consts = {name: int(value, 16) for name, value in
              re.findall(r"mov\.b32 (\w), (0x[0-9a-f]+);", asm)}
    mask = int(re.search(r"and\.b32 a, \$2, (0x[0-9a-f]+);", asm).group(1), 16) & 0xFF
    x = args[0].to(torch.int32)
    bits = ((consts["h"] & 0xFF) << 8) | (x & mask)
    codes = bits.to(torch.int16).view(torch.float16).float()
    if "sub.f16x2" in asm:
        codes -= torch.tensor([consts["k"] & 0xFFFF], dtype=torch.int16).view(torch.float16)[0]
    if "fma.rn.f16x2" in asm:
        codes = codes * args[1].float() + args[2].float()
    return codes.to(dtype)


class SharedBuffer:
    def __init__(self, data: torch.Tensor):
        self.data = data

    def index(self, i) -> SharedBuffer:
        return SharedBuffer(self.data[int(i)])

    def slice(self, start: int, length: int, dim: int = 0) -> SharedBuffer:
        return SharedBuffer(self.data.narrow(dim, start, length))

    def _reinterpret(self, dtype, shape, layout=None) -> SharedBuffer:
        # the kernel merges adjacent dims whose memory order matches their logical order
        return SharedBuffer(self.data.view(dtype).view(shape))

    def load(self, layout=None) -> torch.Tensor:
        return self.data.clone()

    def store(self, value: torch.Tensor) -> None:
        self.data.copy_(value)


class _Program:
    ids = (0, 0, 0)


def _layout(*_args, **_kw):
    return None


def _reduce(fn):
    return lambda x, axis: fn(torch.as_tensor(x), axis)


def _binary(fn):
    return lambda a, b: fn(torch.as_tensor(a), torch.as_tensor(b))


gl = types.SimpleNamespace(
    program_id=lambda axis: torch.tensor(_Program.ids[axis], dtype=torch.int32),
    load=load, store=store, inline_asm_elementwise=inline_asm_elementwise,
    arange=lambda lo, hi, layout=None: torch.arange(lo, hi, dtype=torch.int32),
    full=lambda shape, value, dtype, layout=None: torch.full(shape, value, dtype=dtype),
    zeros=lambda shape, dtype, layout=None: torch.zeros(shape, dtype=dtype),
    where=lambda c, a, b: torch.where(torch.as_tensor(c), a, b),
    maximum=_binary(torch.maximum), minimum=_binary(torch.minimum),
    cdiv=lambda a, b: (a + b - 1) // b,
    exp2=torch.exp2, log2=torch.log2,
    max=_reduce(torch.amax), sum=_reduce(torch.sum),
    reshape=lambda x, shape: x.reshape(shape), permute=lambda x, dims: x.permute(dims),
    expand_dims=lambda x, axis: torch.as_tensor(x).unsqueeze(axis),
    broadcast=lambda a, b: torch.broadcast_tensors(a, b),
    convert_layout=lambda x, layout: x,
    allocate_shared_memory=lambda dtype, shape, layout: SharedBuffer(
        torch.zeros(shape, dtype=dtype)),
    static_range=range, thread_barrier=lambda: None,
    pointer_type=PointerType,
    float16=torch.float16, float32=torch.float32, int32=torch.int32, int64=torch.int64,
    uint8=torch.uint8,
    NVMMADistributedLayout=_layout, DotOperandLayout=_layout, BlockedLayout=_layout,
    SliceLayout=_layout, SwizzledSharedLayout=_layout,
)


def _copy(buf: SharedBuffer, ptr: Ptr, mask=None):
    buf.data.copy_(load(ptr, mask))


async_copy = types.SimpleNamespace(async_copy_global_to_shared=_copy,
                                   commit_group=lambda: None, wait_group=lambda n=0: None)


def mma_v2(a, b, acc):
    return acc + a.float() @ b.float()


def emulate(module: types.ModuleType, kernel_name: str):
    """``module.kernel_name`` as an object launched like the kernel (``k[grid](*args,
    **constexprs)``), running each program's source on the CPU."""
    env = dict(vars(module), gl=gl, async_copy=async_copy, mma_v2=mma_v2,
               plane_asm=plane_asm, _only=_layout)
    for name, value in vars(module).items():
        if hasattr(value, "fn") and type(value).__name__ == "GluonJITFunction":
            fn = value.fn
            env[name] = types.FunctionType(fn.__code__, env, name, fn.__defaults__,
                                           fn.__closure__)
    kernel = env[kernel_name]

    class Launcher:
        def __getitem__(self, grid):
            def launch(*args, num_warps=None, **constexprs):
                args = [Ptr.of(a) if isinstance(a, torch.Tensor) else a for a in args]
                for pid in torch.cartesian_prod(*(torch.arange(n) for n in grid)).tolist():
                    _Program.ids = tuple(pid)
                    kernel(*args, **constexprs)
            return launch

    return Launcher()
