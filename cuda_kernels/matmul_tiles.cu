// Alternative matmul tile configurations, compiled after matmul.cu in one translation
// unit (cuda_loader.KERNEL_UNITS). Every configuration computes the same bits as the
// default one (the arithmetic order does not depend on the tile); benchmarks/bench_cuda.py
// times them against cuBLAS so that the tables in detkit/kernels/cuda.py can pick the
// fastest per (dtype, architecture), and the GPU and emulation tests check the bits.
// Kept out of matmul.cu so the kernels detkit launches compile in a fraction of the time.

DETKIT_SIMT_CONFIG(128x128x16_8x8, 128, 128, 16, 8, 8)
DETKIT_SIMT_CONFIG(64x64x16_4x4, 64, 64, 16, 4, 4)

DETKIT_TC_CONFIG(128x128x32_2x4_s2, 128, 128, 32, 2, 4, 2)
DETKIT_TC_CONFIG(64x128x32_2x2_s3, 64, 128, 32, 2, 2, 3)
DETKIT_TC_CONFIG(64x64x32_2x2_s4, 64, 64, 32, 2, 2, 4)
DETKIT_TC_CONFIG(64x32x64_2x2_s3, 64, 32, 64, 2, 2, 3)
DETKIT_TC_CONFIG(16x64x64_1x4_s3, 16, 64, 64, 1, 4, 3)  // decode-sized rows: no idle mma rows up to M = 16
// Deeper pipelines in dynamic shared memory above 48 KiB (sm_80: up to 163 KiB, sm_90:
// 227 KiB): more bytes of B in flight per CTA, which is what bounds small M.
DETKIT_TC_CONFIG(128x128x64_2x4_s4, 128, 128, 64, 2, 4, 4)
DETKIT_TC_CONFIG(128x64x64_2x2_s4, 128, 64, 64, 2, 2, 4)
DETKIT_TC_CONFIG(64x64x64_2x2_s6, 64, 64, 64, 2, 2, 6)
DETKIT_TC_CONFIG(16x64x128_1x4_s6, 16, 64, 128, 1, 4, 6)
// N / 32 CTAs (128 at N = 4096: one per SM of an H100) with 7 stages of B in flight each.
DETKIT_TC_CONFIG(16x32x128_1x2_s8, 16, 32, 128, 1, 2, 8)
