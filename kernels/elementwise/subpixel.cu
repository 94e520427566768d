// Nearest 2x upsample + 3x3 convolution in the sub-pixel form (see SubpixelWeightsParams): the
// weight fold and the shuffle that interleaves the four phases (adding the convolution's bias).
// Upsampling first and convolving at the high resolution spends 9 taps per output pixel; each
// phase of the output only ever sees a 2x2 window of distinct input pixels, so 4 taps carry the
// same sum (2.25x fewer multiply-adds; Shi et al. 2016, "Real-Time Single Image and Video
// Super-Resolution Using an Efficient Sub-Pixel Convolutional Neural Network", for the layout).
#include "common.cuh"

// Phase a (output row parity) and 2x2 tap r: the 3x3 rows folded into it. Row 2i + a of the
// upsampled image sees upsampled rows 2i + a - 1 .. 2i + a + 1, i.e. low rows i - 1, i, i (a = 0)
// or i, i, i + 1 (a = 1); the 2x2 window of phase a starts at low row i - 1 + a.
__device__ __forceinline__ int fold_first(int a, int r) { return a == 0 ? (r == 0 ? 0 : 1) : (r == 0 ? 0 : 2); }
__device__ __forceinline__ int fold_last(int a, int r) { return a == 0 ? (r == 0 ? 0 : 2) : (r == 0 ? 1 : 2); }

// One thread per output channel o and 8 input channels (in_channels % 8 == 0, checked on the host):
// the 9 taps are read once and all 16 folded (phase, r, s) vectors written from them. With 32-bit
// indices this is memory-bound; one scalar per thread spent its time in 64-bit divisions.
template <typename T> __device__ void subpixel_weights(const SubpixelWeightsParams& p) {
    const T* w = static_cast<const T*>(p.w);
    T* out = static_cast<T*>(p.out);
    const int cin = p.in_channels, cout = p.out_channels, vectors = cin / 8;
    const int total = cout * vectors;  // 16 * cout * cin (the output) < 2^31, checked on the host
    for (int v = blockIdx.x * blockDim.x + threadIdx.x; v < total; v += gridDim.x * blockDim.x) {
        const int o = v / vectors, c = (v % vectors) * 8;
        float taps[9][8];
#pragma unroll
        for (int t = 0; t < 9; ++t) unpack8<T>(load8<T>(w + (o * 9 + t) * cin + c), taps[t]);
#pragma unroll
        for (int phase = 0; phase < 4; ++phase) {
            const int a = phase / 2, b = phase % 2;
#pragma unroll
            for (int rs = 0; rs < 4; ++rs) {
                const int r = rs / 2, s = rs % 2;
                float sum[8] = {0, 0, 0, 0, 0, 0, 0, 0};
#pragma unroll
                for (int y = fold_first(a, r); y <= fold_last(a, r); ++y)
#pragma unroll
                    for (int x = fold_first(b, s); x <= fold_last(b, s); ++x)
#pragma unroll
                        for (int k = 0; k < 8; ++k) sum[k] += taps[y * 3 + x][k];
                store8<T>(out + ((phase * cout + o) * 4 + rs) * cin + c, sum);
            }
        }
    }
}
CELFRAME_KERNELS_FOR_DTYPES(subpixel_weights, SubpixelWeightsParams, subpixel_weights)

// One thread per 8 output channels of one output pixel (channels and skip_channels % 8 == 0,
// checked on the host); a vector past the convolution's channels copies the skip's.
template <typename T> __device__ void subpixel_shuffle(const SubpixelShuffleParams& p) {
    const T* conv = static_cast<const T*>(p.conv);
    const T* bias = static_cast<const T*>(p.bias);
    const T* skip = static_cast<const T*>(p.skip);
    T* out = static_cast<T*>(p.out);
    const int64_t c = p.channels, cs = p.skip_channels, row = c + cs;
    const int64_t oh = 2 * (int64_t)p.height, ow = 2 * (int64_t)p.width;
    const int64_t cw = p.width + 1, ch = p.height + 1;
    const int64_t vectors = row / 8, total = p.images * oh * ow * vectors;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t v = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; v < total; v += stride) {
        const int64_t o = (v % vectors) * 8, pix = v / vectors;
        if (o >= c) {
            *reinterpret_cast<Vec8<T>*>(out + pix * row + o) = load8<T>(skip + pix * cs + (o - c));
            continue;
        }
        const int64_t x = pix % ow, y = (pix / ow) % oh, n = pix / (ow * oh);
        const int a = (int)(y & 1), b = (int)(x & 1);
        const int64_t src = ((n * ch + (y >> 1) + a) * cw + (x >> 1) + b) * 4 * c + (2 * a + b) * c + o;
        float vals[8], bs[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        unpack8<T>(load8<T>(conv + src), vals);
        if (bias) unpack8<T>(load8<T>(bias + o), bs);
#pragma unroll
        for (int k = 0; k < 8; ++k) vals[k] += bs[k];
        store8<T>(out + pix * row + o, vals);
    }
}
CELFRAME_KERNELS_FOR_DTYPES(subpixel_shuffle, SubpixelShuffleParams, subpixel_shuffle)
