"""Weight matmuls on the CPU: omlx's packed bf16 kernel, oneDNN and MKL against MLX float32.

For each model shape (SmolLM2-135M and the ~200M bench model: one decoder layer's seven
projections, and the LM head) and each row count (1, 8, 32, 128, 512: decode to prefill
chunks), times y = x @ W.T with float32 x and y through:

  mlx-f32      MLX float32 (OpenBLAS, preloaded the way `omlx serve` does it)
  omlx-bf16    omlx/kernels/linear.py: W packed bf16 at load, AVX512-BF16 dot products
  onednn-bf16  oneDNN's matmul primitive (PyPI onednn-cpu-gomp: oneDNN 3.2, GNU OpenMP),
               one primitive with a runtime M, weights reordered once into its own layout
  mkl-bf16     MKL's cblas_gemm_bf16bf16f32_compute on B packed once (PyPI mkl,
               MKL_THREADING_LAYER=GNU: Intel's OpenMP beside libgomp halves its speed)

The libraries take bf16 activations, so their time includes rounding x to bf16, as the
omlx kernel's does.  Prints the CPU model and flags, the library versions, each time and
its ratio to mlx-f32 (higher is faster).  Missing libraries are reported and skipped.

    python bench/matmul_bench.py [--rows 1,8,32,128,512] [--repeats 15]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("MKL_THREADING_LAYER", "GNU")  # read when libmkl_rt loads
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omlx.blas import ensure_optimized_blas  # noqa: E402

ensure_optimized_blas(sys.argv)  # before MLX loads: OpenBLAS in place of the reference BLAS

import argparse  # noqa: E402
import ctypes  # noqa: E402
import time  # noqa: E402

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from omlx.blas import blas_info  # noqa: E402
from omlx.kernels.cpu_features import cpu_features  # noqa: E402
from omlx.kernels.linear import kernel, pack_bf16, packed_linear  # noqa: E402

VENV_LIB = Path(sys.prefix) / "lib"  # where the mkl / onednn-cpu-gomp wheels put their libraries

# (name, [(out, in) of each weight]): one decoder layer's projections, and the LM head.
SHAPES = {
    "smollm2-135m layer": [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)],
    "smollm2-135m head": [(49152, 576)],
    "bench-200m layer": [(1024, 1024), (512, 1024), (512, 1024), (1024, 1024), (3072, 1024), (3072, 1024),
                         (1024, 3072)],
    "bench-200m head": [(32000, 1024)],
}


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns, round to nearest even (as the kernels round)."""
    u = x.view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


# ---------------------------------------------------------------------------- backends


class MlxFloat32:
    name = "mlx-f32"

    def __init__(self, w: np.ndarray):
        self.w = mx.array(w)
        mx.eval(self.w)

    def __call__(self, x: np.ndarray, xm: mx.array):
        mx.eval(xm @ self.w.T)


class OmlxBf16:
    name = "omlx-bf16"

    def __init__(self, w: np.ndarray):
        self.n = w.shape[0]
        self.packed = pack_bf16(mx.array(w))
        mx.eval(self.packed)

    def __call__(self, x: np.ndarray, xm: mx.array):
        mx.eval(packed_linear(xm, self.packed, None, self.n))


class Mkl:
    """cblas_gemm_bf16bf16f32 with B (= W.T) packed once into MKL's internal format."""

    name = "mkl-bf16"
    ROW_MAJOR, NO_TRANS, TRANS, PACKED, B_MATRIX = 101, 111, 112, 151, 162
    lib = None

    @classmethod
    def load(cls) -> str:
        path = VENV_LIB / "libmkl_rt.so.2"
        candidates = [path, *sorted(VENV_LIB.glob("libmkl_rt.so*"))]
        found = next((p for p in candidates if p.exists()), None)
        if found is None:
            raise OSError("libmkl_rt not found (pip install mkl)")
        cls.lib = ctypes.CDLL(str(found), mode=ctypes.RTLD_LOCAL)
        cls.lib.cblas_gemm_bf16bf16f32_pack_get_size.restype = ctypes.c_size_t
        buf = ctypes.create_string_buffer(256)
        cls.lib.mkl_get_version_string(buf, 256)
        return f"{buf.value.decode().strip()} (threading layer {os.environ.get('MKL_THREADING_LAYER')})"

    def __init__(self, w: np.ndarray):
        n, k = w.shape
        self.n, self.k = n, k
        lib = self.lib
        size = lib.cblas_gemm_bf16bf16f32_pack_get_size(self.B_MATRIX, 1, n, k)
        self.packed = np.empty(size // 2 + 64, np.uint16)
        wb = bf16_bits(np.ascontiguousarray(w))
        # B = W.T (K x N): W is stored (N, K) row-major, i.e. B transposed with ld = K.
        lib.cblas_gemm_bf16bf16f32_pack(self.ROW_MAJOR, self.B_MATRIX, self.TRANS, 1, n, k,
                                        wb.ctypes.data_as(ctypes.c_void_p), k,
                                        self.packed.ctypes.data_as(ctypes.c_void_p))

    def __call__(self, x: np.ndarray, xm: mx.array):
        m = x.shape[0]
        xb = bf16_bits(x)
        y = np.empty((m, self.n), np.float32)
        self.lib.cblas_gemm_bf16bf16f32_compute(
            self.ROW_MAJOR, self.NO_TRANS, self.PACKED, m, self.n, self.k, ctypes.c_float(1.0),
            xb.ctypes.data_as(ctypes.c_void_p), self.k, self.packed.ctypes.data_as(ctypes.c_void_p), self.n,
            ctypes.c_float(0.0), y.ctypes.data_as(ctypes.c_void_p), self.n)


class OneDnn:
    """oneDNN's matmul primitive: bf16 src (runtime M) x bf16 weights (its chosen layout,
    reordered once) -> f32 dst.  Constants are oneDNN's C API values (dnnl_types.h; stable
    within the libdnnl.so.3 ABI)."""

    name = "onednn-bf16"
    CPU, F32, BF16, ANY, AB = 1, 3, 2, 1, 3
    ARG_SRC, ARG_WEIGHTS, ARG_DST, ARG_FROM, ARG_TO = 1, 33, 17, 1, 17
    QUERY_WEIGHTS_MD = 131
    RUNTIME = -(2**63)
    lib = engine = stream = None

    class ExecArg(ctypes.Structure):
        _fields_ = [("arg", ctypes.c_int), ("memory", ctypes.c_void_p)]

    class Version(ctypes.Structure):
        _fields_ = [("major", ctypes.c_int), ("minor", ctypes.c_int), ("patch", ctypes.c_int),
                    ("hash", ctypes.c_char_p), ("cpu_runtime", ctypes.c_uint), ("gpu_runtime", ctypes.c_uint)]

    @classmethod
    def check(cls, status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"oneDNN {what} failed (status {status})")

    @classmethod
    def load(cls) -> str:
        found = next((p for p in (VENV_LIB / "libdnnl.so.3", VENV_LIB / "libdnnl.so") if p.exists()), None)
        if found is None:
            raise OSError("libdnnl not found (pip install onednn-cpu-gomp)")
        lib = cls.lib = ctypes.CDLL(str(found), mode=ctypes.RTLD_LOCAL)
        lib.dnnl_version.restype = ctypes.POINTER(cls.Version)
        lib.dnnl_primitive_desc_query_md.restype = ctypes.c_void_p
        lib.dnnl_memory_desc_get_size.restype = ctypes.c_size_t
        lib.dnnl_memory_desc_get_size.argtypes = [ctypes.c_void_p]
        for name in ("dnnl_memory_create", "dnnl_primitive_execute", "dnnl_matmul_primitive_desc_create",
                     "dnnl_reorder_primitive_desc_create", "dnnl_primitive_create", "dnnl_memory_set_data_handle",
                     "dnnl_stream_wait", "dnnl_primitive_desc_query_md"):
            getattr(lib, name).argtypes = None
        cls.engine, cls.stream = ctypes.c_void_p(), ctypes.c_void_p()
        cls.check(lib.dnnl_engine_create(ctypes.byref(cls.engine), cls.CPU, ctypes.c_size_t(0)), "engine")
        cls.check(lib.dnnl_stream_create(ctypes.byref(cls.stream), cls.engine, ctypes.c_uint(1)), "stream")
        v = lib.dnnl_version().contents
        return f"oneDNN {v.major}.{v.minor}.{v.patch} (GNU OpenMP)"

    @classmethod
    def md(cls, dims: list[int], dtype: int, tag: int) -> ctypes.c_void_p:
        out = ctypes.c_void_p()
        arr = (ctypes.c_int64 * 12)(*dims)
        cls.check(cls.lib.dnnl_memory_desc_create_with_tag(ctypes.byref(out), len(dims), arr, dtype, tag), "md")
        return out

    @classmethod
    def md_strided(cls, dims: list[int], dtype: int, strides: list[int]) -> ctypes.c_void_p:
        out = ctypes.c_void_p()
        cls.check(cls.lib.dnnl_memory_desc_create_with_strides(
            ctypes.byref(out), len(dims), (ctypes.c_int64 * 12)(*dims), dtype, (ctypes.c_int64 * 12)(*strides)), "md")
        return out

    def memory(self, md, data: np.ndarray | None) -> ctypes.c_void_p:
        mem = ctypes.c_void_p()
        handle = ctypes.c_void_p(data.ctypes.data) if data is not None else ctypes.c_void_p(2**64 - 1)
        self.check(self.lib.dnnl_memory_create(ctypes.byref(mem), md, self.engine, handle), "memory")
        return mem

    def __init__(self, w: np.ndarray):
        lib = self.lib
        n, k = w.shape
        self.n, self.k = n, k
        src = self.md([self.RUNTIME, k], self.BF16, self.AB)
        dst = self.md([self.RUNTIME, n], self.F32, self.AB)
        weights_any = self.md([k, n], self.BF16, self.ANY)
        self.pd = ctypes.c_void_p()
        self.check(lib.dnnl_matmul_primitive_desc_create(ctypes.byref(self.pd), self.engine, src, weights_any,
                                                         None, dst, None), "matmul pd")
        self.prim = ctypes.c_void_p()
        self.check(lib.dnnl_primitive_create(ctypes.byref(self.prim), self.pd), "matmul")
        # Reorder W.T (K x N, from W stored (N, K): strides (1, K)) into the primitive's layout.
        chosen = ctypes.c_void_p(lib.dnnl_primitive_desc_query_md(self.pd, self.QUERY_WEIGHTS_MD, 0))
        self.wb = bf16_bits(np.ascontiguousarray(w))
        plain = self.md_strided([k, n], self.BF16, [1, k])
        self.packed = np.empty(lib.dnnl_memory_desc_get_size(chosen) // 2 + 64, np.uint16)
        src_mem, dst_mem = self.memory(plain, self.wb), self.memory(chosen, self.packed)
        rpd, reorder = ctypes.c_void_p(), ctypes.c_void_p()
        self.check(lib.dnnl_reorder_primitive_desc_create(ctypes.byref(rpd), plain, self.engine, chosen,
                                                          self.engine, None), "reorder pd")
        self.check(lib.dnnl_primitive_create(ctypes.byref(reorder), rpd), "reorder")
        args = (self.ExecArg * 2)(self.ExecArg(self.ARG_FROM, src_mem), self.ExecArg(self.ARG_TO, dst_mem))
        self.check(lib.dnnl_primitive_execute(reorder, self.stream, 2, args), "reorder run")
        self.check(lib.dnnl_stream_wait(self.stream), "wait")
        self.weights_mem = dst_mem
        self.per_m: dict[int, tuple] = {}

    def __call__(self, x: np.ndarray, xm: mx.array):
        m = x.shape[0]
        if m not in self.per_m:  # memory objects per row count (cheap; the primitive is shared)
            xb, y = np.empty((m, self.k), np.uint16), np.empty((m, self.n), np.float32)
            src = self.memory(self.md([m, self.k], self.BF16, self.AB), xb)
            dst = self.memory(self.md([m, self.n], self.F32, self.AB), y)
            args = (self.ExecArg * 3)(self.ExecArg(self.ARG_SRC, src), self.ExecArg(self.ARG_WEIGHTS, self.weights_mem),
                                      self.ExecArg(self.ARG_DST, dst))
            self.per_m[m] = (xb, y, args)
        xb, y, args = self.per_m[m]
        xb[...] = bf16_bits(x)
        self.check(self.lib.dnnl_primitive_execute(self.prim, self.stream, 3, args), "matmul run")
        self.lib.dnnl_stream_wait(self.stream)


# ---------------------------------------------------------------------------- timing


def best_seconds(fns, x: np.ndarray, xm: mx.array, repeats: int) -> list[float]:
    """Each backend's fastest of `repeats` runs, the backends interleaved run by run so that
    load from other processes falls on all of them alike."""
    for fn in fns:
        fn(x, xm)
        fn(x, xm)
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn(x, xm)
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def check_agreement(backends, w: np.ndarray) -> None:
    """Every bf16 backend computes the same thing (bf16 operands, float32 sums)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, w.shape[1])).astype(np.float32)
    ref = mx.array(x).astype(mx.bfloat16).astype(mx.float32) @ mx.array(w).astype(mx.bfloat16).astype(mx.float32).T
    ref = np.array(ref)
    for b in backends[1:]:
        if isinstance(b, OmlxBf16):
            got = np.array(packed_linear(mx.array(x), b.packed, None, b.n))
        elif isinstance(b, Mkl):
            xb, y = bf16_bits(x), np.empty((5, b.n), np.float32)
            b.lib.cblas_gemm_bf16bf16f32_compute(b.ROW_MAJOR, b.NO_TRANS, b.PACKED, 5, b.n, b.k, ctypes.c_float(1.0),
                                                 xb.ctypes.data_as(ctypes.c_void_p), b.k,
                                                 b.packed.ctypes.data_as(ctypes.c_void_p), b.n, ctypes.c_float(0.0),
                                                 y.ctypes.data_as(ctypes.c_void_p), b.n)
            got = y
        else:
            b(x, None)
            got = b.per_m[5][1].copy()
        err = float(np.max(np.abs(got - ref)) / (np.max(np.abs(ref)) + 1e-30))
        if err > 1e-4:
            raise RuntimeError(f"{b.name} disagrees with the bf16 reference (relative error {err:.2e})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,8,32,128,512")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated keys of SHAPES")
    args = parser.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    features = cpu_features()
    module = kernel()
    print(f"CPU: {features.model} ({os.cpu_count()} logical CPUs); ISA: {features.summary()}")
    print(f"mlx {mx.__version__}; BLAS for MLX float32: {blas_info()}")
    print(f"omlx _linear_cpu: {module.isa()}, {module.num_threads()} OpenMP threads")
    classes = [MlxFloat32, OmlxBf16]
    for cls in (OneDnn, Mkl):
        try:
            print(f"{cls.name}: {cls.load()}")
            classes.append(cls)
        except Exception as exc:  # noqa: BLE001 - a missing library is reported, not fatal
            print(f"{cls.name}: not available ({exc})")
    print(f"load average: {os.getloadavg()[0]:.2f} (timings under load drop 2-3x; compare the ratios)\n")
    names = [c.name for c in classes]
    print(f"{'shape':22} {'rows':>5} " + " ".join(f"{n:>13}" for n in names) + "   (ms; x = speed vs mlx-f32)")
    rng = np.random.default_rng(0)
    for key in args.shapes.split(","):
        weights = [(rng.standard_normal(s) * 0.05).astype(np.float32) for s in SHAPES[key]]
        backends = [[cls(w) for cls in classes] for w in weights]
        for per_weight, w in zip(backends, weights):
            check_agreement(per_weight, w)
        for m in rows:
            xs = [rng.standard_normal((m, w.shape[1])).astype(np.float32) for w in weights]
            xms = [mx.array(x) for x in xs]
            mx.eval(xms)
            per_weight = [best_seconds(b, x, xm, args.repeats) for b, x, xm in zip(backends, xs, xms)]
            totals = [sum(times[i] for times in per_weight) for i in range(len(classes))]
            cells = [f"{totals[0] * 1e3:9.3f}    "] + [f"{t * 1e3:8.3f} {totals[0] / t:4.2f}x" for t in totals[1:]]
            print(f"{key:22} {m:5d} " + " ".join(f"{c:>13}" for c in cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
