"""NT-Xent and the Table 4 variants against naive references written straight from the formulas."""

import math

import pytest
import torch

from simclr_cli.losses.contrastive import margin_triplet, nt_logistic, nt_xent


def naive_nt_xent(z1, z2, tau):
    """SIMCLR.md section 2, literally: 2N views, l(i,j) = -log exp(s_ij/t) / sum_{k != i} exp(s_ik/t)."""
    z = [v.double() for v in torch.cat([z1, z2])]
    n2 = len(z)
    n = n2 // 2

    def sim(u, v):
        return (u @ v) / (u.norm() * v.norm())

    total = 0.0
    for i in range(n2):
        j = (i + n) % n2
        denom = sum(torch.exp(sim(z[i], z[k]) / tau) for k in range(n2) if k != i)
        total = total - torch.log(torch.exp(sim(z[i], z[j]) / tau) / denom)
    return total / n2


@pytest.mark.parametrize("n", [1, 2, 5, 16])
@pytest.mark.parametrize("tau", [0.07, 0.1, 0.5, 1.0])
def test_nt_xent_matches_naive_formula(n, tau):
    g = torch.Generator().manual_seed(n * 100 + int(tau * 100))
    z1, z2 = torch.randn(n, 8, generator=g), torch.randn(n, 8, generator=g)
    assert nt_xent(z1, z2, tau).double().item() == pytest.approx(naive_nt_xent(z1, z2, tau).item(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-6), (torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 1e-2)])
def test_nt_xent_dtypes(dtype, tol):
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(8, 32, generator=g), torch.randn(8, 32, generator=g)
    ref = naive_nt_xent(z1.to(dtype), z2.to(dtype), 0.5).item()
    got = nt_xent(z1.to(dtype), z2.to(dtype), 0.5)
    assert got.dtype == torch.promote_types(dtype, torch.float32)  # at least float32 whatever the input
    assert got.item() == pytest.approx(ref, rel=tol)


def test_nt_xent_gradient_matches_naive():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    nt_xent(a, b, 0.2).backward()
    ga, gb = a.grad.clone(), b.grad.clone()
    a.grad = b.grad = None
    naive_nt_xent(a, b, 0.2).backward()
    torch.testing.assert_close(ga, a.grad.float().double(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gb, b.grad.float().double(), rtol=1e-4, atol=1e-6)


def test_self_similarity_is_masked_not_subtracted():
    """Identical views: the masked loss is log(2N-1) exactly when all other views are orthogonal."""
    n = 4
    z = torch.eye(2 * n)[:n] * 3.0  # orthogonal unit directions
    loss = nt_xent(z, z.clone(), temperature=1.0).item()
    # positive sim 1, self masked, 2N-2 negatives at sim 0: -log(e / (e + 2N-2))
    expected = -math.log(math.e / (math.e + 2 * n - 2))
    assert loss == pytest.approx(expected, rel=1e-6)


def _pairs(z1, z2):
    """Normalized views and, per anchor i, its positive j and its 2N-2 negatives."""
    z = torch.nn.functional.normalize(torch.cat([z1, z2]).double(), dim=1)
    n2 = len(z)
    for i in range(n2):
        j = (i + n2 // 2) % n2
        yield z, i, j, [k for k in range(n2) if k not in (i, j)]


def naive_nt_logistic(z1, z2, tau):
    total, count = 0.0, 0
    for z, i, j, negs in _pairs(z1, z2):
        pos = torch.nn.functional.logsigmoid(z[i] @ z[j] / tau)
        neg = sum(torch.nn.functional.logsigmoid(-(z[i] @ z[k]) / tau) for k in negs) / len(negs)
        total, count = total - (pos + neg), count + 1
    return total / count


def naive_margin_triplet(z1, z2, m):
    total, count = 0.0, 0
    for z, i, j, negs in _pairs(z1, z2):
        total += sum(torch.clamp(z[i] @ z[k] - z[i] @ z[j] + m, min=0) for k in negs) / len(negs)
        count += 1
    return total / count


@pytest.mark.parametrize("n", [2, 7])
def test_variants_match_naive(n):
    g = torch.Generator().manual_seed(n)
    z1, z2 = torch.randn(n, 5, generator=g), torch.randn(n, 5, generator=g)
    assert nt_logistic(z1, z2, 0.3).item() == pytest.approx(naive_nt_logistic(z1, z2, 0.3).item(), rel=1e-5)
    assert margin_triplet(z1, z2, 0.5).item() == pytest.approx(naive_margin_triplet(z1, z2, 0.5).item(), rel=1e-5)


@pytest.mark.parametrize("loss", [nt_xent, nt_logistic, margin_triplet])
def test_losses_run_in_fp32_under_bf16_autocast(loss):
    """Issue 11 item 2: under autocast the similarity matmul must not run in bf16 (about 2% gradient
    error at N=256, tau=0.1); loss and gradient equal the fp32 ones."""
    g = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(256, 128, generator=g), torch.randn(256, 128, generator=g)
    arg = 0.1 if loss is not margin_triplet else 0.5

    def value_and_grad(autocast: bool):
        a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = loss(a, b, arg)
        out.backward()
        return out, torch.cat([a.grad, b.grad])

    ref, ref_grad = value_and_grad(False)
    out, grad = value_and_grad(True)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(ref.item(), rel=1e-6)
    assert ((grad - ref_grad).norm() / ref_grad.norm()).item() < 1e-5
