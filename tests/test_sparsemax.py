"""sparsemax / sparsestmax against brute-force float64 references written here."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from syncsn.sparsemax import (
    _sparsestmax_unchecked,
    _sparsestmax_vjp,
    is_one_hot,
    sparsemax,
    sparsestmax,
)

SQRT_2_3 = math.sqrt(2 / 3)
SQRT_1_2 = math.sqrt(1 / 2)


# --------------------------------------------------------------------------- references


def sq_dist(a: list[float], b: list[float]) -> float:
    return sum((x - y) ** 2 for x, y in zip(a, b, strict=True))


def brute_sparsemax(z: list[float]) -> tuple[list[float], float]:
    """Projection onto the simplex by enumerating every face, float64.

    On face S the projection onto its affine hull is z_i - tau with tau = (sum_S z - 1)/|S|.
    The projection onto the simplex is the closest of the candidates that are feasible.
    Returns the point and the margin: how far the input is from changing support.
    """
    best, best_dist, best_margin = None, math.inf, 0.0
    n = len(z)
    for size in range(1, n + 1):
        for face in itertools.combinations(range(n), size):
            tau = (sum(z[i] for i in face) - 1) / size
            p = [z[i] - tau if i in face else 0.0 for i in range(n)]
            if min(p[i] for i in face) < 0:
                continue
            dist = sq_dist(p, z)
            if dist < best_dist:
                off = [tau - z[i] for i in range(n) if i not in face]
                best, best_dist = p, dist
                best_margin = min([p[i] for i in face] + off)
    return best, best_margin


def ref_sparsestmax(z: list[float], r: float) -> tuple[list[float], dict]:
    """Transcription of the sparsestmax definition, float64, recursion written plainly.

    Returns the point and info: rounds taken, whether it stopped on a degenerate point, and
    the smallest margin to any branch boundary met on the way (for choosing gradcheck points).
    """
    n = len(z)
    w, margin = brute_sparsemax(z)
    rad, centre_prev = r, None
    info = {"rounds": 0, "degenerate": False, "pushed": False}
    while True:
        info["rounds"] += 1
        support = [i for i in range(n) if w[i] > 0]
        if len(support) == 1:
            info["margin"] = margin
            return [1.0 if i == support[0] else 0.0 for i in range(n)], info
        centre = [1 / len(support) if i in support else 0.0 for i in range(n)]
        if centre_prev is not None:
            rad = math.sqrt(max(rad**2 - sq_dist(centre, centre_prev), 0))
        dist = math.sqrt(sq_dist(w, centre))
        margin = min(margin, abs(dist - rad), dist)
        # Equal entries on the support (ties): w is the centre, the push has no direction.
        tied = len({w[i] for i in support}) == 1
        if tied:
            info["degenerate"] = True
        if tied or dist >= rad:
            info["margin"] = margin
            return w, info
        p = [c + rad * (a - c) / dist for a, c in zip(w, centre, strict=True)]
        info["pushed"] = True
        margin = min([margin] + [abs(p[i]) for i in support])
        if min(p) >= 0:
            info["margin"] = margin
            return p, info
        w, m = brute_sparsemax(p)
        margin = min(margin, m)
        centre_prev = centre


def random_logits(rng: random.Random, k: int) -> list[float]:
    """Logits of varied kinds: generic, tied (small integers), near-equal, large magnitude."""
    kind = rng.randrange(4)
    if kind == 0:
        return [rng.gauss(0, 1) for _ in range(k)]
    if kind == 1:
        return [float(rng.randrange(-2, 3)) * 0.25 for _ in range(k)]
    if kind == 2:
        c = rng.gauss(0, 3)
        return [c + rng.gauss(0, 1e-3) for _ in range(k)]
    scale = 10 ** rng.uniform(2, 7)
    return [rng.gauss(0, scale) for _ in range(k)]


def on_simplex(p: torch.Tensor, tol: float) -> bool:
    return bool((p >= 0).all()) and bool(((p.sum(-1) - 1).abs() <= tol).all())


# --------------------------------------------------------------------------- sparsemax


def test_sparsemax_matches_brute_force_float64():
    rng = random.Random(0)
    checked = 0
    for k in range(1, 7):
        for _ in range(150):
            z = random_logits(rng, k)
            expected, _ = brute_sparsemax(z)
            got = sparsemax(torch.tensor(z, dtype=torch.float64))
            scale = max(1.0, max(abs(v) for v in z))
            torch.testing.assert_close(
                got, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12 * scale
            )
            checked += 1
    assert checked == 900


def test_sparsemax_float32_close_to_float64_reference_and_on_simplex():
    rng = random.Random(1)
    for k in (2, 3, 5):
        z = torch.tensor([random_logits(rng, k) for _ in range(400)], dtype=torch.float32)
        got = sparsemax(z)
        expected = torch.tensor(
            [brute_sparsemax(row)[0] for row in z.double().tolist()], dtype=torch.float64
        )
        assert on_simplex(got, 1e-6)
        # Large logits lose their low digits in float32 itself; compare where they are O(1).
        moderate = z.abs().amax(-1) < 100
        torch.testing.assert_close(got[moderate].double(), expected[moderate], rtol=0, atol=1e-5)


def test_sparsemax_large_magnitudes_stay_exact():
    for dtype in (torch.float32, torch.float64):
        rows = [[3e30, -1e30, 2e30], [1e8, 1e8, -1e8], [-5e20, -5e20, -5e20]]
        z = torch.tensor(rows, dtype=dtype)
        p = sparsemax(z)
        assert torch.equal(p[0], torch.tensor([1.0, 0.0, 0.0], dtype=dtype))
        assert torch.equal(p[1], torch.tensor([0.5, 0.5, 0.0], dtype=dtype))
        torch.testing.assert_close(p[2], torch.full((3,), 1 / 3, dtype=dtype))


def test_sparsemax_batched_along_any_dim():
    torch.manual_seed(0)
    z = torch.randn(4, 5, 3, dtype=torch.float64)
    for dim in (0, 1, 2, -1, -2):
        got = sparsemax(z, dim=dim)
        moved = z.movedim(dim, -1)
        rows = moved.reshape(-1, moved.shape[-1]).tolist()
        expected = torch.tensor([brute_sparsemax(row)[0] for row in rows], dtype=torch.float64)
        torch.testing.assert_close(got.movedim(dim, -1).reshape(-1, moved.shape[-1]), expected)


def test_sparsemax_gradcheck_and_gradgradcheck():
    torch.manual_seed(1)
    for k in (2, 3, 6):
        z = (torch.randn(8, k, dtype=torch.float64) * 1.5).requires_grad_()
        assert torch.autograd.gradcheck(lambda t: sparsemax(t, dim=-1), (z,))
        assert torch.autograd.gradgradcheck(lambda t: sparsemax(t, dim=-1), (z,))
        zt = z.detach().t().contiguous().requires_grad_()
        assert torch.autograd.gradcheck(lambda t: sparsemax(t, dim=0), (zt,))


def test_sparsemax_backward_matches_closed_form_written_out():
    torch.manual_seed(2)
    z = torch.randn(50, 4, dtype=torch.float64, requires_grad=True)
    g = torch.randn(50, 4, dtype=torch.float64)
    (grad,) = torch.autograd.grad(sparsemax(z), z, g)
    p = sparsemax(z.detach())
    for i in range(50):
        s = p[i] > 0
        jac = torch.diag(s.double()) - torch.outer(s.double(), s.double()) / s.sum()
        torch.testing.assert_close(grad[i], jac @ g[i])


def test_sparsemax_rejects_bad_input():
    with pytest.raises(TypeError, match="floating-point"):
        sparsemax(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="scalar"):
        sparsemax(torch.tensor(1.0))
    with pytest.raises(ValueError, match="empty"):
        sparsemax(torch.zeros(2, 0))
    with pytest.raises(IndexError, match="dim must be in"):
        sparsemax(torch.zeros(2, 3), dim=2)
    with pytest.raises(TypeError, match="torch.Tensor"):
        sparsemax([1.0, 2.0])


def test_sparsemax_of_logits_without_a_projection_is_nan_as_softmax_is():
    """NaN or +inf logits (one bad optimizer step), or only -inf ones, have no projection:
    the slice is NaN, forward and backward, as torch.softmax gives; other slices are
    untouched. -inf entries beside finite ones get weight 0, as in softmax."""
    nan, inf = math.nan, math.inf
    z = torch.tensor(
        [[nan, 0.0, 0.0], [inf, 0.0, 0.0], [-inf, -inf, -inf], [1.0, 0.8, -1.0], [-inf, 0.0, 0.2]],
        dtype=torch.float64,
        requires_grad=True,
    )
    p = sparsemax(z)
    softmax = torch.softmax(z.detach(), dim=-1)
    assert torch.equal(p[:3].isnan(), softmax[:3].isnan()) and bool(p[:3].isnan().all())
    torch.testing.assert_close(p[3], torch.tensor([0.6, 0.4, 0.0], dtype=torch.float64))
    torch.testing.assert_close(p[4], torch.tensor([0.0, 0.4, 0.6], dtype=torch.float64))
    p.backward(torch.arange(15, dtype=torch.float64).view(5, 3))
    assert bool(z.grad[:3].isnan().all())
    assert bool(z.grad[3:].isfinite().all())
    # The same along another dimension, and the unchecked sparsestmax the layers use.
    assert bool(sparsemax(torch.tensor([[nan], [0.0]]), dim=0).isnan().all())
    radius = torch.tensor(0.5)
    assert bool(_sparsestmax_unchecked(torch.tensor([0.0, nan, 1.0]), radius).isnan().all())
    grad = _sparsestmax_vjp(torch.tensor([0.0, inf, 1.0]), radius, torch.ones(3))
    assert bool(grad.isnan().all())


# --------------------------------------------------------------------------- sparsestmax


RADII = [0.0, 0.05, 0.2, 0.35, 0.5, 0.6, 0.7, 0.75, 0.8, 0.9, 1.0]


def test_sparsestmax_matches_reference_float64():
    rng = random.Random(3)
    compared, kinds = 0, set()
    total = 0
    for k in (2, 3, 4):
        for _ in range(250):
            z = random_logits(rng, k)
            r = rng.choice(RADII)
            expected, info = ref_sparsestmax(z, r)
            total += 1
            if info["margin"] < 1e-9 and not info["degenerate"]:
                continue  # on a branch boundary: either side is right
            got = sparsestmax(torch.tensor(z, dtype=torch.float64), r)
            scale = max(1.0, max(abs(v) for v in z))
            torch.testing.assert_close(
                got, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-10 * scale
            )
            compared += 1
            kinds.add((info["rounds"], info["pushed"], info["degenerate"]))
    assert compared >= 0.95 * total
    # The comparison covered: kept as is, pushed within the face, re-projected, degenerate.
    assert {(1, False, False), (1, True, False), (1, False, True)} <= kinds
    assert any(rounds >= 2 and pushed for rounds, pushed, _ in kinds)


def test_sparsestmax_batched_equals_rows_and_radius_tensor_broadcasts():
    torch.manual_seed(4)
    z = torch.randn(30, 3, dtype=torch.float64)
    r = torch.rand(30, dtype=torch.float64)
    batched = sparsestmax(z, r)
    rows = torch.stack([sparsestmax(z[i], float(r[i])) for i in range(30)])
    torch.testing.assert_close(batched, rows, rtol=0, atol=1e-14)
    scalar_tensor = sparsestmax(z, torch.tensor(0.4, dtype=torch.float64))
    torch.testing.assert_close(scalar_tensor, sparsestmax(z, 0.4), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparsestmax_on_simplex_never_nan(dtype):
    rng = random.Random(5)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    for k in (2, 3):
        z = torch.tensor([random_logits(rng, k) for _ in range(300)], dtype=dtype)
        for r in RADII + [SQRT_1_2, SQRT_2_3, 2.0]:
            leaf = z.clone().requires_grad_()
            p = sparsestmax(leaf, r)
            assert torch.isfinite(p).all()
            assert on_simplex(p, tol), (r, p[(p.sum(-1) - 1).abs() > tol])
            (grad,) = torch.autograd.grad(p, leaf, torch.randn_like(p))
            assert torch.isfinite(grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparsestmax_at_zero_radius_is_sparsemax(dtype):
    rng = random.Random(6)
    z = torch.tensor([random_logits(rng, 3) for _ in range(300)], dtype=dtype)
    assert torch.equal(sparsestmax(z, 0.0), sparsemax(z))
    assert torch.equal(sparsestmax(z[:, :2], 0), sparsemax(z[:, :2]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparsestmax_keeps_distance_r_from_centre_of_initial_support(dtype):
    """||p - u0|| >= r, u0 the centre of sparsemax(z)'s face, unless one-hot or degenerate.

    (After a re-projection the point is nearer the centre of its own, smaller face: the
    radius there is reduced; the distance to u0 is the invariant.)
    """
    rng = random.Random(7)
    atol = 1e-6 if dtype == torch.float32 else 1e-12
    checked = 0
    for _ in range(600):
        k = rng.choice((2, 3, 4))
        z = random_logits(rng, k)
        r = rng.uniform(0, 1.1)
        _, info = ref_sparsestmax(z, r)
        if info["degenerate"]:
            continue
        p = sparsestmax(torch.tensor(z, dtype=dtype), r).double()
        if is_one_hot(p):
            continue
        w0 = sparsemax(torch.tensor(z, dtype=torch.float64))
        s = w0 > 0
        u0 = s.double() / s.sum()
        assert torch.linalg.vector_norm(p - u0) >= r - atol, (z, r, p)
        checked += 1
    assert checked > 200


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparsestmax_one_hot_beyond_vertex_distance(dtype):
    rng = random.Random(8)
    for k, boundary in ((3, SQRT_2_3), (2, SQRT_1_2)):
        for r in (boundary, boundary + 1e-3, 0.9, 1.0, 3.0):
            for _ in range(200):
                z = [rng.gauss(0, rng.choice((1e-3, 1.0, 10.0))) for _ in range(k)]
                if min(abs(a - b) for a, b in itertools.combinations(z, 2)) < 1e-5:
                    continue  # ties (down to float32 resolution) are the degenerate exception
                p = sparsestmax(torch.tensor(z, dtype=dtype), r)
                assert is_one_hot(p), (z, r, p)
                assert p.sum() == 1 and p.max() == 1


def test_sparsestmax_not_one_hot_just_below_vertex_distance():
    # The bound is tight: near the middle of an edge, radius a little under sqrt(2/3)
    # ends on the edge, not at a vertex.
    z = torch.tensor([0.3, 0.31, 0.2], dtype=torch.float64)
    p = sparsestmax(z, SQRT_2_3 - 1e-3)
    assert not is_one_hot(p) and p[2] == 0 and p[1] > p[0] > 0
    expected, _ = ref_sparsestmax(z.tolist(), SQRT_2_3 - 1e-3)
    torch.testing.assert_close(p, torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparsestmax_degenerate_returns_the_centre_with_sparsemax_gradient(dtype):
    cases = [
        ([1.0, 1.0, 1.0], [1 / 3] * 3),  # the initial logits of every SSN layer
        ([-7.5, -7.5, -7.5], [1 / 3] * 3),
        ([2.0, 2.0, -9.0], [0.5, 0.5, 0.0]),  # tie on a two-element support
        ([0.4, 0.4], [0.5, 0.5]),
    ]
    for z, centre in cases:
        for r in (0.0, 0.3, SQRT_2_3, 1.0):
            leaf = torch.tensor(z, dtype=dtype, requires_grad=True)
            p = sparsestmax(leaf, r)
            torch.testing.assert_close(p, torch.tensor(centre, dtype=dtype))
            g = torch.arange(len(z), dtype=dtype)
            (grad,) = torch.autograd.grad(p, leaf, g)
            zs = leaf.detach().clone().requires_grad_()
            (expected,) = torch.autograd.grad(sparsemax(zs), zs, g)
            torch.testing.assert_close(grad, expected)
            assert grad.abs().sum() > 0  # training can break the tie


def test_sparsestmax_tie_kept_by_symmetric_push_is_finite_and_on_edge():
    # Pushing from the centre towards the middle of an edge re-projects onto exactly that
    # middle: degenerate on the second round. It must stay finite and on the simplex.
    for dtype in (torch.float32, torch.float64):
        leaf = torch.tensor([0.5, 0.5, 0.3], dtype=dtype, requires_grad=True)
        p = sparsestmax(leaf, 1.0)
        torch.testing.assert_close(p, torch.tensor([0.5, 0.5, 0.0], dtype=dtype))
        (grad,) = torch.autograd.grad(p, leaf, torch.tensor([1.0, -1.0, 0.5], dtype=dtype))
        assert torch.isfinite(grad).all() and grad[0] != grad[1]


def test_sparsestmax_float32_one_hot_sums_to_exactly_one():
    # Near a vertex float32 round-off would leave 0.99999994; one-hot results are exact.
    torch.manual_seed(9)
    lead = torch.tensor([1 - 1e-6, 1 - 1e-7, 1.0, 1 + 1e-6, 5.0, 1e7])
    z = torch.stack([lead, torch.zeros(6), torch.full((6,), -1e-7)], dim=1)
    z = torch.cat([z, torch.randn(500, 3) * 3])
    for r in (0.0, 0.3, 0.6, 0.75, SQRT_2_3, 1.0):
        p = sparsestmax(z, r)
        assert torch.isfinite(p).all()
        for row in p:
            if is_one_hot(row):
                assert row.sum() == 1 and row.max() == 1
            else:
                assert abs(float(row.sum()) - 1) <= 1e-6
    near_vertex = sparsestmax(z[:6], 0.0)
    assert all(is_one_hot(row) for row in near_vertex[3:])


def _branch_is_stable(z: list[float], r: float) -> bool:
    """True when the reference takes the same branches in a neighbourhood of z."""
    _, info = ref_sparsestmax(z, r)
    return info["margin"] > 1e-3 and not info["degenerate"]


def test_sparsestmax_gradcheck_float64_on_every_branch():
    rng = random.Random(10)
    seen = set()
    for _ in range(400):
        k = rng.choice((2, 3))
        z = [rng.gauss(0, 0.5) for _ in range(k)]
        r = rng.uniform(0, 1)
        if not _branch_is_stable(z, r):
            continue
        _, info = ref_sparsestmax(z, r)
        branch = (k, info["rounds"], info["pushed"])
        if branch in seen:
            continue
        seen.add(branch)
        leaf = torch.tensor(z, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t, r=r: sparsestmax(t, r), (leaf,), atol=1e-6)
    # kept, pushed in face, re-projected then pushed/kept, one-hot: for 2 and 3 entries.
    assert {(3, 1, False), (3, 1, True), (2, 1, False), (2, 1, True)} <= seen
    assert any(k == 3 and rounds >= 2 for k, rounds, _ in seen)


def test_sparsestmax_rejects_bad_input():
    z = torch.zeros(3)
    with pytest.raises(ValueError, match=">= 0"):
        sparsestmax(z, -0.1)
    with pytest.raises(ValueError, match=">= 0"):
        sparsestmax(z, float("nan"))
    with pytest.raises(TypeError, match="float or a Tensor"):
        sparsestmax(z, "0.5")
    with pytest.raises(ValueError, match="broadcastable"):
        sparsestmax(torch.zeros(4, 3), torch.zeros(5))
    with pytest.raises(ValueError, match="finite"):
        sparsestmax(torch.tensor([0.0, float("inf"), 1.0]), 0.5)
    with pytest.raises(TypeError, match="floating-point"):
        sparsestmax(torch.tensor([1, 2]), 0.5)
    with pytest.raises(ValueError, match="empty"):
        sparsestmax(torch.zeros(0), 0.5)


def test_is_one_hot():
    assert is_one_hot(torch.tensor([0.0, 1.0, 0.0]))
    assert is_one_hot(torch.tensor([1.0]))
    assert not is_one_hot(torch.tensor([0.5, 0.5, 0.0]))
    assert not is_one_hot(torch.tensor([1e-30, 1.0, 0.0]))
    assert not is_one_hot(torch.zeros(3))
    with pytest.raises(ValueError, match="1-D"):
        is_one_hot(torch.eye(3))


def test_sparsestmax_unchecked_gives_the_same_bits_without_host_reads():
    """The layers' entry point: no argument checks, nothing read on the host (the rounds are
    a fixed sequence of tensor operations), the same values and gradients as sparsestmax,
    and a batch gives the same bits as its rows (SSN computes both vectors in one call)."""
    from test_no_sync import NoHostSync

    rng = random.Random(11)
    for k in (1, 2, 3, 4):
        z = torch.tensor([random_logits(rng, k) for _ in range(64)], dtype=torch.float64)
        r = torch.tensor([rng.choice(RADII + [SQRT_2_3, 2.0]) for _ in range(64)])
        r = r.to(torch.float64)
        public = z.clone().requires_grad_()
        unchecked = z.clone().requires_grad_()
        expected = sparsestmax(public, r)
        with NoHostSync() as mode:
            got = _sparsestmax_unchecked(unchecked, r)
            g = torch.linspace(-1, 1, got.numel(), dtype=got.dtype).view_as(got)
            (grad,) = torch.autograd.grad(got, unchecked, g)
        assert mode.checked > 0
        assert torch.equal(got, expected)
        assert torch.equal(grad, torch.autograd.grad(expected, public, g)[0])
        rows = torch.stack([_sparsestmax_unchecked(z[i], r[i]) for i in range(64)])
        assert torch.equal(rows, got.detach())
        # Stopping once every vector has its result (SSN on CPU): the same bits, row by row
        # (most rows stop after the first round) and as a batch.
        for i in range(64):
            row = z[i].clone().requires_grad_()
            early = _sparsestmax_unchecked(row, r[i], stop_early=True)
            assert torch.equal(early, got[i].detach()), (k, i)
            (early_grad,) = torch.autograd.grad(early, row, g[i])
            assert torch.equal(early_grad, grad[i]), (k, i)
        batch = z.clone().requires_grad_()
        early = _sparsestmax_unchecked(batch, r, stop_early=True)
        assert torch.equal(early, got.detach())
        assert torch.equal(torch.autograd.grad(early, batch, g)[0], grad)
