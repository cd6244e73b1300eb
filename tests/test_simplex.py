"""Tests for simplex.py: vertex geometry checked against hand formulas, and the fixed head never trains V."""

import pytest
import torch

from simplex import FixedPolytopeHead, dcube, dorthoplex, dsimplex, polytope_dim, polytope_vertices

DIMS = [1, 2, 3, 5, 8, 16]


def _check_common(V, K, d):
    assert V.dtype == torch.float32 and V.shape == (K, d)
    torch.testing.assert_close(V.norm(dim=1), torch.ones(K), atol=1e-6, rtol=0)  # unit rows
    torch.testing.assert_close(V.sum(dim=0), torch.zeros(d), atol=1e-5, rtol=0)  # centred
    assert torch.unique(V, dim=0).shape[0] == K  # K distinct vertices


@pytest.mark.parametrize("d", DIMS)
def test_simplex(d):
    V = dsimplex(d)
    _check_common(V, d + 1, d)
    expected = torch.full((d + 1, d + 1), -1.0 / d)  # off-diagonal -1/d
    expected.fill_diagonal_(1.0)
    torch.testing.assert_close(V @ V.T, expected, atol=1e-6, rtol=0)


def test_simplex_small_by_hand():
    torch.testing.assert_close(dsimplex(1), torch.tensor([[1.0], [-1.0]]))  # a segment: +-1
    V = dsimplex(2)  # equilateral triangle on the unit circle: every side has length sqrt(3)
    torch.testing.assert_close(torch.cdist(V, V)[~torch.eye(3, dtype=torch.bool)], torch.full((6,), 3 ** 0.5))


@pytest.mark.parametrize("d", DIMS)
def test_orthoplex(d):
    V = dorthoplex(d)
    _check_common(V, 2 * d, d)
    C = V @ V.T  # (2d, 2d)
    idx = torch.arange(2 * d)
    antipode = (idx[:, None] - idx[None, :]).abs() == d  # rows i and i+d are e_i and -e_i
    expected = torch.zeros(2 * d, 2 * d)
    expected[antipode] = -1.0
    expected.fill_diagonal_(1.0)
    assert torch.equal(C, expected)  # exactly 1, 0 or -1


@pytest.mark.parametrize("d", [1, 2, 3, 5, 8])
def test_cube(d):
    V = dcube(d)
    _check_common(V, 2 ** d, d)
    torch.testing.assert_close(V.abs(), torch.full_like(V, d ** -0.5))  # every coordinate +-1/sqrt(d)
    signs = V > 0  # (K, d) sign patterns
    hamming = (signs[:, None, :] != signs[None, :, :]).sum(-1).float()  # (K, K)
    torch.testing.assert_close(V @ V.T, (d - 2 * hamming) / d, atol=1e-6, rtol=0)


def test_cube_limit_and_bad_dims():
    assert dcube(16).shape == (65536, 16)
    with pytest.raises(ValueError, match="d must be <= 16"):
        dcube(17)
    for build in (dsimplex, dorthoplex, dcube):
        for bad in (0, -3, 2.0):
            with pytest.raises(ValueError, match="integer >= 1"):
                build(bad)


def test_dispatch():
    assert torch.equal(polytope_vertices("simplex", 4), dsimplex(4))
    assert torch.equal(polytope_vertices("orthoplex", 4), dorthoplex(4))
    assert torch.equal(polytope_vertices("cube", 4), dcube(4))
    with pytest.raises(ValueError, match="unknown polytope kind"):
        polytope_vertices("hexagon", 4)


def test_polytope_dim():
    assert [polytope_dim("simplex", K) for K in (2, 3, 10, 513)] == [1, 2, 9, 512]
    assert [polytope_dim("orthoplex", K) for K in (2, 4, 10, 1024)] == [1, 2, 5, 512]
    assert [polytope_dim("cube", K) for K in (2, 4, 8, 1024, 65536)] == [1, 2, 3, 10, 16]
    # every kind's dimension gives back K vertices
    for kind, K in [("simplex", 7), ("orthoplex", 12), ("cube", 32)]:
        assert polytope_vertices(kind, polytope_dim(kind, K)).shape[0] == K
    for kind, K in [("simplex", 1), ("simplex", 0), ("orthoplex", 7), ("orthoplex", 0), ("cube", 6),
                    ("cube", 1), ("cube", 2 ** 17), ("cube", 12.0)]:
        with pytest.raises(ValueError, match=f"{kind} cannot have K={K}"):
            polytope_dim(kind, K)
    with pytest.raises(ValueError, match="unknown polytope kind"):
        polytope_dim("sphere", 8)


@pytest.mark.parametrize("kind,K,d", [("simplex", 10, 9), ("orthoplex", 10, 5), ("cube", 16, 4)])
def test_head_shapes(kind, K, d):
    head = FixedPolytopeHead(12, K, kind)
    assert head.proj.weight.shape == (d, 12) and head.vertices.shape == (K, d)
    assert head(torch.randn(3, 12)).shape == (3, K)
    assert head(torch.randn(2, 5, 12)).shape == (2, 5, K)  # any leading dims
    assert f"kind={kind}, d={d}, K={K}" in repr(head)
    with pytest.raises(ValueError, match="cannot have K="):
        FixedPolytopeHead(12, 7, "cube")


def test_head_formula():
    torch.manual_seed(0)
    head = FixedPolytopeHead(6, 4, "simplex")  # d = 3, still a trainable map even if in_dim were 3
    x = torch.randn(5, 6)
    torch.testing.assert_close(head(x), (x @ head.proj.weight.T) @ dsimplex(3).T)
    assert len(list(FixedPolytopeHead(3, 4, "simplex").parameters())) == 1  # in_dim == d: W still trains


def test_vertices_never_trained():
    torch.manual_seed(0)
    head = FixedPolytopeHead(8, 8, "orthoplex", bias=True)  # d = 4
    params = list(head.parameters())
    assert len(params) == 2 and all(p is not head.vertices for p in params)
    assert not head.vertices.requires_grad
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=0.5)
    assert all(p is not head.vertices for g in opt.param_groups for p in g["params"])
    V0, W0 = head.vertices.clone(), head.proj.weight.detach().clone()
    x, y = torch.randn(16, 8), torch.randint(0, 8, (16,))
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(head(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.equal(head.vertices, V0)  # bitwise unchanged, despite weight decay
    assert head.vertices.grad is None
    assert not torch.allclose(head.proj.weight, W0)  # while the linear map did train


def test_no_projection():
    head = FixedPolytopeHead(5, 6, "simplex", project=False)  # d = 5 = in_dim
    assert list(head.parameters()) == [] and head.proj is None
    x = torch.randn(4, 5)
    torch.testing.assert_close(head(x), x @ dsimplex(5).T)
    with pytest.raises(ValueError, match="in_dim == d"):
        FixedPolytopeHead(7, 6, "simplex", project=False)
    with pytest.raises(ValueError, match="bias=True needs project=True"):
        FixedPolytopeHead(5, 6, "simplex", bias=True, project=False)


def test_state_dict_roundtrip(tmp_path):
    head = FixedPolytopeHead(8, 8, "cube")  # d = 3
    sd = head.state_dict()
    assert set(sd) == {"proj.weight", "vertices"} and torch.equal(sd["vertices"], dcube(3))
    torch.save(sd, tmp_path / "head.pt")
    fresh = FixedPolytopeHead(8, 8, "cube")
    fresh.load_state_dict(torch.load(tmp_path / "head.pt", weights_only=True))
    x = torch.randn(2, 8)
    assert torch.equal(fresh(x), head(x))
    assert set(FixedPolytopeHead(3, 8, "cube", project=False).state_dict()) == {"vertices"}
