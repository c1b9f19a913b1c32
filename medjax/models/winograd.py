"""3x3 stride-1 convolutions by Winograd's minimal filtering F(m x m, 3 x 3) (Lavin & Gray, 2016).

The padded input is cut into overlapping (m + 2) x (m + 2) tiles (stride m); each tile and the kernel are
taken to the transform domain (`B^T d B`, `G k G^T`), where the convolution becomes (m + 2)^2 independent
matmuls [tiles, cin] @ [cin, cout], and each product tile is taken back (`A^T M A`) to m x m outputs.
F(2x2, 3x3) does 16 multiplies per 4 outputs, F(4x4, 3x3) 36 per 16, against 36 and 144 for the direct
convolution: 2.25x and 4x fewer. The transforms are elementwise passes that XLA fuses; the matmuls are
XLA's. Their matrices have small exact entries for m = 2 (0, +-1, +-1/2) and m = 4 (up to 8 and 1/24),
so float32 results differ from the direct convolution by rounding only: about 1e-6 (m = 2) and 1e-5
(m = 4) of the output's largest magnitude. Meant for float32; bf16 would lose too much in the transforms.

The kernel gradient is the same algorithm transposed: `G^T (sum over tiles of V^T dM) G`, where V is the
transformed input and dM the output cotangent's tiles taken through `A`. The input gradient of a 3x3
stride-1 convolution is itself one (with the kernel flipped and transposed), see `layers.py`.
"""

import numpy as np
import jax.numpy as jnp
from jax import lax

# (B^T, G, A^T) for F(m x m, 3 x 3), m -> matrices; interpolation points 0, +-1 (m = 2) and 0, +-1, +-2
# (m = 4), as in Lavin & Gray's paper.
TRANSFORMS = {
    2: (
        np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float64),
        np.array([[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]], np.float64),
        np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float64),
    ),
    4: (
        np.array(
            [
                [4, 0, -5, 0, 1, 0],
                [0, -4, -4, 1, 1, 0],
                [0, 4, -4, -1, 1, 0],
                [0, -2, -1, 2, 1, 0],
                [0, 2, -1, -2, 1, 0],
                [0, 4, 0, -5, 0, 1],
            ],
            np.float64,
        ),
        np.array(
            [
                [1 / 4, 0, 0],
                [-1 / 6, -1 / 6, -1 / 6],
                [-1 / 6, 1 / 6, -1 / 6],
                [1 / 24, 1 / 12, 1 / 6],
                [1 / 24, -1 / 12, 1 / 6],
                [0, 0, 1],
            ],
            np.float64,
        ),
        np.array(
            [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]], np.float64
        ),
    ),
}


def _combine(matrix: np.ndarray, pieces: list) -> list:
    """[sum_k matrix[i, k] * pieces[k] for each row i], skipping zero coefficients and unit multiplies."""
    rows = []
    for coefficients in matrix:
        total = None
        for c, piece in zip(coefficients, pieces):
            if c == 0:
                continue
            term = piece if c == 1 else -piece if c == -1 else piece * np.asarray(c, piece.dtype)
            total = term if total is None else total + term
        rows.append(total)
    return rows


def _tile_counts(out_shape, m: int) -> tuple[int, int]:
    return -(-out_shape[0] // m), -(-out_shape[1] // m)


def transform_input(x: jnp.ndarray, pads, m: int) -> tuple[jnp.ndarray, tuple[int, int]]:
    """[n, h, w, c] -> (V [(m + 2)^2, n * th * tw, c], output (oh, ow)): B^T d B for every input tile.

    Rows first, then columns (two fused passes over strided slices; measured faster than one pass that
    reads all (m + 2)^2 slices). The input is zero-padded by `pads` and then to whole tiles.
    """
    bt = TRANSFORMS[m][0]
    a = m + 2
    n, h, w, c = x.shape
    (top, bottom), (left, right) = pads
    oh, ow = h + top + bottom - 2, w + left + right - 2
    th, tw = _tile_counts((oh, ow), m)
    config = ((0, 0, 0), (top, th * m + 2 - h - top, 0), (left, tw * m + 2 - w - left, 0), (0, 0, 0))
    xp = lax.pad(x, jnp.zeros((), x.dtype), config)
    rows = [lax.slice_in_dim(xp, k, k + m * (th - 1) + 1, m, axis=1) for k in range(a)]  # [n, th, wp, c]
    by_row = jnp.stack(_combine(bt, rows))  # [a, n, th, wp, c]
    cols = [lax.slice_in_dim(by_row, k, k + m * (tw - 1) + 1, m, axis=3) for k in range(a)]
    v = jnp.stack(_combine(bt, cols), axis=1)  # [a (rows), a (columns), n, th, tw, c]
    return v.reshape(a * a, n * th * tw, c), (oh, ow)


def transform_kernel(kernel: jnp.ndarray, m: int) -> jnp.ndarray:
    """[3, 3, cin, cout] -> U [(m + 2)^2, cin, cout]: G k G^T for every channel pair."""
    g = jnp.asarray(TRANSFORMS[m][1], kernel.dtype)
    u = jnp.einsum("ik,klco,jl->ijco", g, kernel, g, precision=lax.Precision.HIGHEST)
    return u.reshape((m + 2) ** 2, *kernel.shape[2:])


def transform_output(products: jnp.ndarray, n: int, out_shape, m: int) -> jnp.ndarray:
    """M [(m + 2)^2, n * th * tw, cout] -> y [n, oh, ow, cout]: A^T M A for every tile, tiles joined."""
    at = TRANSFORMS[m][2]
    a = m + 2
    th, tw = _tile_counts(out_shape, m)
    cout = products.shape[-1]
    tiles = products.reshape(a, a, n, th, tw, cout)
    by_column = _combine(at, [tiles[:, j] for j in range(a)])  # m x [a (rows), n, th, tw, cout]
    out = [_combine(at, [column[i] for i in range(a)]) for column in by_column]  # out[q][p]
    y = jnp.stack([jnp.stack([out[q][p] for q in range(m)], axis=3) for p in range(m)], axis=2)
    y = y.reshape(n, th * m, tw * m, cout)  # [n, th, p, tw, q, cout] joined
    return y[:, : out_shape[0], : out_shape[1]]


def conv(x: jnp.ndarray, kernel: jnp.ndarray, pads, m: int, precision=None, u=None) -> jnp.ndarray:
    """3x3 stride-1 NHWC/HWIO convolution of `x` zero-padded by `pads`, by F(m x m, 3 x 3); `u` is
    `transform_kernel(kernel, m)` when the caller has it already."""
    v, out_shape = transform_input(x, pads, m)
    u = transform_kernel(kernel, m) if u is None else u
    products = lax.dot_general(v, u, (((2,), (1,)), ((0,), (0,))), precision=precision)
    return transform_output(products, x.shape[0], out_shape, m).astype(jnp.result_type(x, kernel))


def kernel_grad_products(x: jnp.ndarray, g: jnp.ndarray, pads, m: int, precision=None) -> jnp.ndarray:
    """dU [(m + 2)^2, cin, cout] = V^T dM per transform position, summed over the batch's tiles.

    dM is the output cotangent's tiles taken through A; V is channel-major so that each product is a
    plain row-major matmul over the tiles. Accumulates in float32. Sums over batch chunks add up.
    """
    at = TRANSFORMS[m][2]
    a = m + 2
    n, c = x.shape[0], x.shape[3]
    cout = g.shape[3]
    v, out_shape = transform_input(x, pads, m)
    th, tw = _tile_counts(out_shape, m)
    gp = jnp.pad(g, ((0, 0), (0, th * m - out_shape[0]), (0, tw * m - out_shape[1]), (0, 0)))
    tiles = gp.reshape(n, th, m, tw, m, cout)
    by_column = _combine(at.T, [tiles[:, :, p] for p in range(m)])  # a x [n, th, tw, m (q), cout]
    dm = [_combine(at.T, [row[:, :, :, q] for q in range(m)]) for row in by_column]  # dm[i][j]
    dm = jnp.stack([piece for row in dm for piece in row]).reshape(a * a, n * th * tw, cout)
    v = jnp.swapaxes(v, 1, 2)  # [a * a, c, tiles]
    return lax.dot_general(
        v, dm, (((2,), (1,)), ((0,), (0,))), precision=precision, preferred_element_type=jnp.float32
    )


def kernel_grad_from_products(du: jnp.ndarray, m: int) -> jnp.ndarray:
    """dk [3, 3, cin, cout] = G^T dU G (the transpose of `transform_kernel`), in float32."""
    gm = jnp.asarray(TRANSFORMS[m][1], jnp.float32)
    du = du.reshape(m + 2, m + 2, *du.shape[1:])
    return jnp.einsum("ik,ijco,jl->klco", gm, du, gm, precision=lax.Precision.HIGHEST)


def kernel_grad(x: jnp.ndarray, g: jnp.ndarray, pads, m: int, precision=None) -> jnp.ndarray:
    """Kernel cotangent [3, 3, cin, cout] of `conv(x, kernel, pads, m)` for output cotangent `g`."""
    return kernel_grad_from_products(kernel_grad_products(x, g, pads, m, precision), m)
