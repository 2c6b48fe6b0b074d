// detkit triangular solve: X = A^-1 B for a lower-triangular A, batched, in the canonical
// order of docs/canonical-orders.md (solve_triangular) under both guarantees.
//
// Forward substitution is sequential down a column, so one thread owns one column of one
// batch entry: x[i] starts at b[i], takes fma(-a[i, j], x[j], x[i]) for j = 0 .. i-1 in
// order, then is divided by a[i, i] unless the matrix is unitriangular. The threads of a
// warp hold consecutive columns, so their loads of b and their x are coalesced and each
// a[i, j] is one broadcast load. x stays float32 until the end: it is kept in ``ws`` (the
// output itself for float32, which is why y is not __restrict__) and rounded once into T
// per element.

#define SV_THREADS 128  // columns per block

template <typename T>
__device__ __forceinline__ void solve_lower(const T* __restrict__ a, const T* __restrict__ b, float* ws,
                                            T* y, int n, int k, int col_blocks, int unit) {
    const i64 t = blockIdx.x / col_blocks;  // batch entry
    const int c = (blockIdx.x % col_blocks) * SV_THREADS + threadIdx.x;
    if (c >= k) return;
    const T* at = a + t * n * (i64)n;
    const T* bt = b + t * n * (i64)k + c;
    float* xt = ws + t * n * (i64)k + c;
    for (int i = 0; i < n; ++i) {
        float acc = to_f32(bt[(i64)i * k]);
        const T* ai = at + (i64)i * n;
        for (int j = 0; j < i; ++j) acc = __fmaf_rn(-to_f32(ai[j]), xt[(i64)j * k], acc);
        if (!unit) acc = __fdiv_rn(acc, to_f32(ai[i]));
        xt[(i64)i * k] = acc;
    }
    T* yt = y + t * n * (i64)k + c;
    for (int i = 0; i < n; ++i) yt[(i64)i * k] = from_f32<T>(xt[(i64)i * k]);
}

#define DETKIT_SOLVE_ENTRY(SUF, T)                                                                 \
    extern "C" __global__ void __launch_bounds__(SV_THREADS)                                       \
    solve_lower_##SUF(const T* a, const T* b, float* ws, T* y, int n, int k, int col_blocks, int unit) { \
        solve_lower<T>(a, b, ws, y, n, k, col_blocks, unit);                                       \
    }

DETKIT_SOLVE_ENTRY(f32, float)
DETKIT_SOLVE_ENTRY(bf16, bf16)
DETKIT_SOLVE_ENTRY(f16, f16)
