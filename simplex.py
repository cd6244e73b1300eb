"""
Fixed regular-polytope heads: the last layer's class directions are not learned but set to the vertices
of a regular polytope, and only the features before them are trained.

Reference: F. Pernici, M. Bruni, C. Baecchi, A. Del Bimbo, "Regular Polytope Networks",
IEEE Transactions on Neural Networks and Learning Systems (TNNLS), 2021.

Geometry. A head y = z @ V^T scores a feature z (d dims) against K unit directions, the rows of V.
Learning V costs d*K parameters; fixing V to a regular polytope costs none and loses little, because
its vertices are already as good as prototypes get: they are equiangular (every pair of distinct
vertices has the same angle, except antipodes) and maximally separated for their count and dimension.
The features then learn to align with these fixed directions instead of both sides chasing each other.
Three polytopes exist in every dimension d:
    simplex    K = d + 1   cos(v_i, v_j) = -1/d for i != j (the most separated K points that fit in d dims)
    orthoplex  K = 2d      +-e_i: each vertex is orthogonal to all others but its antipode (cos 0 or -1)
    cube       K = 2^d     all sign patterns / sqrt(d): cos = (d - 2*hamming)/d, many classes in few dims
All three are centred (vertices sum to zero) and have unit-norm rows.

FixedPolytopeHead = a trainable bias-free nn.Linear (in_dim -> d) followed by the fixed vertex matrix V,
registered as a persistent buffer: it is saved in checkpoints, moves with .to(device), and is never a
Parameter, so no optimizer (and no weight decay) ever touches it.

Left out on purpose: a bias on the K logits (the fixed vertices alone define the classes), and the regular
polytopes that exist only in dimensions 2-4 (polygons, icosahedron, 24-cell, ...): from d = 5 on, these
three families are the only regular polytopes there are.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

KINDS = ("simplex", "orthoplex", "cube")
MAX_CUBE_DIM = 16  # 2^16 = 65536 vertices; beyond that the vertex matrix is too large to be a sensible head


def _check_dim(d):
    if not isinstance(d, int) or isinstance(d, bool) or d < 1:
        raise ValueError(f"polytope dimension d must be an integer >= 1, got {d!r}")


def dsimplex(d):
    """The d-simplex: K = d+1 unit vectors in d dims with pairwise cosine -1/d. Returns float32 (d+1, d)."""
    _check_dim(d)
    # e_1..e_d plus a*(1,...,1): the choice a = (1 - sqrt(d+1))/d puts that last vertex at distance sqrt(2)
    # from every e_i, the same distance the e_i have from each other, so all K points are equidistant.
    a = (1.0 - math.sqrt(d + 1)) / d
    V = torch.cat([torch.eye(d, dtype=torch.float64),
                   torch.full((1, d), a, dtype=torch.float64)])  # (d+1, d)
    V = V - V.mean(dim=0, keepdim=True)  # (d+1, d) centred on the origin, so equidistant -> equiangular
    V = V / V.norm(dim=1, keepdim=True)  # (d+1, d) unit rows; built in float64 so float32 cosines are exact
    return V.float()  # (d+1, d)


def dorthoplex(d):
    """The d-orthoplex (cross-polytope): K = 2d vectors +-e_i. Returns float32 (2d, d), rows e_1..e_d, -e_1..-e_d."""
    _check_dim(d)
    I = torch.eye(d, dtype=torch.float32)  # (d, d)
    return torch.cat([I, -I])  # (2d, d)


def dcube(d):
    """The d-cube: K = 2^d vectors, every sign pattern scaled by 1/sqrt(d). Returns float32 (2^d, d)."""
    _check_dim(d)
    if d > MAX_CUBE_DIM:
        raise ValueError(f"cube with d={d} would have 2^{d} vertices; d must be <= {MAX_CUBE_DIM}")
    bits = (torch.arange(2 ** d)[:, None] >> torch.arange(d)) & 1  # (2^d, d) row k = binary digits of k
    signs = 1.0 - 2.0 * bits.float()  # (2^d, d) bit 0 -> +1, bit 1 -> -1
    return signs / math.sqrt(d)  # (2^d, d) unit rows


_BUILDERS = {"simplex": dsimplex, "orthoplex": dorthoplex, "cube": dcube}


def polytope_vertices(kind, d):
    """Vertices of the regular polytope `kind` in d dims: float32 (K, d), unit rows, summing to zero."""
    if kind not in _BUILDERS:
        raise ValueError(f"unknown polytope kind {kind!r}; expected one of {KINDS}")
    return _BUILDERS[kind](d)


def polytope_dim(kind, K):
    """The dimension d in which polytope `kind` has exactly K vertices (simplex K-1, orthoplex K/2, cube log2 K)."""
    if kind not in _BUILDERS:
        raise ValueError(f"unknown polytope kind {kind!r}; expected one of {KINDS}")
    ok = isinstance(K, int) and not isinstance(K, bool) and K >= 2
    if ok and kind == "simplex":
        return K - 1
    if ok and kind == "orthoplex" and K % 2 == 0:
        return K // 2
    if ok and kind == "cube" and K & (K - 1) == 0 and K.bit_length() - 1 <= MAX_CUBE_DIM:
        return K.bit_length() - 1  # log2 K, exact for a power of two
    need = {"simplex": "an integer >= 2",
            "orthoplex": "an even integer >= 2",
            "cube": f"a power of two from 2 to 2^{MAX_CUBE_DIM}"}[kind]
    raise ValueError(f"a {kind} cannot have K={K!r} vertices; K must be {need}")


class FixedPolytopeHead(nn.Module):
    """y = (x @ W^T) @ V^T: a trainable linear map to d dims, then K fixed polytope vertices as class directions.

    project=False drops the linear map (needs in_dim == d): the input then meets the vertices directly and the
    head has no trainable part (used after an existing projection).
    """

    def __init__(self, in_dim, out_dim, kind, bias=False, project=True):
        super().__init__()
        d = polytope_dim(kind, out_dim)  # out_dim = K logits
        if not project and in_dim != d:
            raise ValueError(f"project=False needs in_dim == d: a {kind} with K={out_dim} lives in d={d}, "
                             f"got in_dim={in_dim}")
        if not project and bias:
            raise ValueError("bias=True needs project=True (the bias belongs to the linear map)")
        self.kind, self.d, self.K = kind, d, out_dim
        self.proj = nn.Linear(in_dim, d, bias=bias) if project else None  # trainable W: (d, in_dim)
        # a buffer, not a Parameter: saved in state_dict, moved by .to(), invisible to optimizers and weight decay
        self.register_buffer("vertices", polytope_vertices(kind, d), persistent=True)  # V: (K, d)

    def forward(self, x):  # x: (..., in_dim)
        z = self.proj(x) if self.proj is not None else x  # (..., d)
        return F.linear(z, self.vertices)  # (..., K) = z @ V^T, one score per vertex

    def extra_repr(self):
        return f"kind={self.kind}, d={self.d}, K={self.K}"
