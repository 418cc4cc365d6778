"""Exact GELU, softmax and attention that run fast on MLX's CPU backend; other backends use MLX's own kernels.

On the CPU backend ``mx.exp`` and ``mx.erf`` run as scalar loops (~20 and ~45 ns an element here), so the ViT-g's
softmax and GELU took a third of its time. ``mx.compile`` fuses elementwise graphs into one vectorised loop, but
splits graphs deeper than about ten ops into several kernels that go through memory; the polynomials below are
written in Estrin's form, whose depth is logarithmic in the degree, so that each stays one kernel. Accuracy matches
the library functions (relative error ~2e-7 for exp, 4.3e-7 absolute for erf).
"""

from __future__ import annotations

import functools

import mlx.core as mx
import mlx.nn as nn

# erf(x) = x P(x^2) / Q(x^2) on |x| <= 4 (|erf| rounds to 1 beyond): a rational least-squares fit of ours.
_ERF_P = (1.1283791965695398, 0.18389874554307276, 0.05440442869193157, 0.003829439038932399,
          0.00038983011488108037, 4.99055502256918e-06, -1.4693025915179535e-08)
_ERF_Q = (1.0, 0.4963097340689713, 0.11364963044740335, 0.015458702782334773, 0.001317082543699741,
          6.599595411286557e-05)
# 2^f on |f| <= 1/2: a relative least-squares fit of ours (max relative error 4.4e-9).
_EXP2 = (1.0000000004120868, 0.6931471992093463, 0.24022647364067634, 0.05550342278966816, 0.009618491035161401,
         0.001339470358282649, 0.00015332504847173634)
_LOG2E = 1.4426950408889634
_ROUND = 12582912.0  # 1.5 * 2^23: (t + _ROUND) - _ROUND rounds t to the nearest integer in float32


def _estrin(c: tuple[float, ...], x: mx.array, x2: mx.array) -> mx.array:
    """c[0] + c[1] x + c[2] x^2 + ... evaluated pairwise, in depth O(log degree)."""
    pairs = [c[i] + c[i + 1] * x if i + 1 < len(c) else c[i] for i in range(0, len(c), 2)]
    power = x2
    while len(pairs) > 1:
        pairs = [pairs[i] + power * pairs[i + 1] if i + 1 < len(pairs) else pairs[i] for i in range(0, len(pairs), 2)]
        power = power * power
    return pairs[0]


# GELU(x) = x (1/2 + w P(w^2) / Q(w^2)) with w = clip(x, +-4 sqrt 2): the erf fit above with its argument's 1/sqrt 2
# and GELU's 1/2 folded into the coefficients. MLX inlines at most 16 constants in a fused kernel; a 17th becomes
# an input and turns the kernel into a slow strided loop, hence the folding. The clip is written with abs():
# MLX's minimum/maximum check for NaN, which keeps the compiler from vectorising the loop (2.5x slower).
_GELU_P = tuple(0.5 * c / (2 ** 0.5 * 2 ** i) for i, c in enumerate(_ERF_P))
_GELU_Q = tuple(c / 2 ** i for i, c in enumerate(_ERF_Q))
_GELU_CLIP = 4 * 2 ** 0.5


@mx.compile
def _gelu(x: mx.array) -> mx.array:
    w = 0.5 * (mx.abs(x + _GELU_CLIP) - mx.abs(x - _GELU_CLIP))
    v = w * w
    v2 = v * v
    return x * (0.5 + w * _estrin(_GELU_P, v, v2) / _estrin(_GELU_Q, v, v2))


def gelu(x: mx.array) -> mx.array:
    """Exact (erf) GELU, as transformers' "gelu"."""
    if mx.default_device() != mx.cpu:
        return nn.gelu(x)
    return _gelu(x.astype(mx.float32)).astype(x.dtype)


@mx.compile
def _exp_parts(x: mx.array) -> tuple[mx.array, mx.array]:
    # exp(x) = 2^n * 2^f with n = round(x log2 e): 2^f from the polynomial, 2^n as float32 exponent bits.
    t = mx.maximum(x * _LOG2E, -127.0)  # 2^-127 has exponent bits 0: the result is 0, as exp underflows
    n = (t + _ROUND) - _ROUND
    f = t - n
    return _estrin(_EXP2, f, f * f), mx.left_shift((n + 127.0).astype(mx.int32), 23)


def softmax(scores: mx.array) -> mx.array:
    """Softmax over the last axis, in float32."""
    if mx.default_device() != mx.cpu:
        return mx.softmax(scores, axis=-1, precise=True)
    return _softmax(scores.astype(mx.float32))


# The exponent bits (mx.view) have no derivative in MLX: training goes through these functions' own vjps.
@mx.custom_function
def _softmax(scores: mx.array) -> mx.array:
    mantissa, exponent = _exp_parts(scores - scores.max(axis=-1, keepdims=True))
    e = mantissa * mx.view(exponent, mx.float32)
    return e / e.sum(axis=-1, keepdims=True)


@_softmax.vjp
def _softmax_vjp(primals, cotangent, output):
    return (output * (cotangent - (cotangent * output).sum(axis=-1, keepdims=True)),)


@mx.compile
def _exp_shifted(scores: mx.array, shift: mx.array, coef: float) -> mx.array:
    """exp(coef (scores - shift)) in one fused kernel, for coef > 0 and shift >= scores (so the result is <= 1)."""
    t = mx.maximum((scores - shift) * (coef * _LOG2E), -127.0)
    n = (t + _ROUND) - _ROUND
    f = t - n
    return _estrin(_EXP2, f, f * f) * mx.view(mx.left_shift((n + 127.0).astype(mx.int32), 23), mx.float32)


@functools.cache
def _exp_shifted_fn(coef: float):
    """``_exp_shifted`` for one ``coef``, differentiable; the shift gets no gradient (the callers normalise by the
    sum of the exponentials, which cancels any shift)."""

    @mx.custom_function
    def exp_shifted(scores, shift):
        return _exp_shifted(scores, shift, coef)

    @exp_shifted.vjp
    def exp_shifted_vjp(primals, cotangent, output):
        return cotangent * output * coef, mx.zeros_like(primals[1])

    return exp_shifted


def _key_sum(e_t: mx.array) -> mx.array:
    """Sums over axis -2 (the keys) of a (..., keys, queries) array, as a (..., 1, queries) matrix product.

    MLX's CPU reductions are scalar loops; a product with a row of ones goes through the BLAS (~10x faster).
    """
    return mx.ones((1, e_t.shape[-2]), dtype=e_t.dtype) @ e_t


def _attention_t(scores_t: mx.array, scale: float) -> tuple[mx.array, mx.array]:
    """Unnormalised softmax weights of transposed scores (..., keys, queries), and their sums (..., 1, queries).

    Keys run down the columns: MLX's column reductions vectorise (max over axis -2 is ~3x faster than over -1), and
    the weights come out laid out as the product with V^T needs them. Normalising after that product divides
    (..., head_dim, queries) numbers instead of (..., keys, queries).
    """
    scores_t = scores_t.astype(mx.float32)
    e_t = _exp_shifted_fn(float(scale))(scores_t, scores_t.max(axis=-2, keepdims=True))
    return e_t, _key_sum(e_t)


def attention_from_qkv_t(qkv_t: mx.array, num_heads: int, scale: float) -> mx.array:
    """Self-attention on the CPU backend from the transposed qkv projection, with no copies between the products.

    ``qkv_t`` is (B, 3 D, L): ``W_qkv @ x^T``, rows q, k, v, head after head. Every operand below is then a plain or
    transposed contiguous matrix per head, which the BLAS reads in place; the result is (B, D, L), the attention
    output transposed, ready for the output projection as ``out_t.swapaxes(-1, -2)``.
    """
    B, three_d, L = qkv_t.shape
    y = qkv_t.reshape(B, 3, num_heads, three_d // (3 * num_heads), L)
    q_t, k_t, v_t = y[:, 0], y[:, 1], y[:, 2]  # (B, H, head_dim, L)
    e_t, z = _attention_t(k_t.swapaxes(-1, -2) @ q_t, scale)  # scores^T: (B, H, keys, queries)
    out_t = (v_t @ e_t.astype(v_t.dtype)) / z.astype(v_t.dtype)  # (B, H, head_dim, queries)
    return out_t.reshape(B, three_d // 3, L)


def scaled_dot_product_attention(q, k, v, *, scale: float, mask: mx.array | None = None) -> mx.array:
    """``mx.fast.scaled_dot_product_attention``, on the CPU backend with the exp above and transposed scores."""
    if mx.default_device() != mx.cpu:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    scores_t = k @ q.swapaxes(-1, -2)  # (..., keys, queries)
    if mask is not None:  # scaled first: a mask of dtype-minimum entries must not overflow when divided by the scale
        mask_t = mask.swapaxes(-1, -2) if mask.ndim >= 2 else mask[:, None]
        scores_t, scale = scores_t.astype(mx.float32) * scale + mask_t, 1.0
    e_t, z = _attention_t(scores_t, scale)
    return (e_t.swapaxes(-1, -2).astype(v.dtype) @ v) / z.swapaxes(-1, -2).astype(v.dtype)
