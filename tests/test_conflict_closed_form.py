"""The fused observer's closed-form CEL gradient equals autograd on the pure loss function."""

import torch

from stgc.conflict import _cel_grad_neg_logit_ce, cel_loss


def test_closed_form_cel_gradient_equals_autograd():
    g = torch.Generator().manual_seed(0)
    T, E, A = 11, 4, 16
    logits = torch.randn(T, E, generator=g, dtype=torch.float64)
    token_A = torch.randint(0, T, (A,), generator=g)
    expert_A = torch.randint(0, E, (A,), generator=g)
    conflict_A = torch.rand(A, generator=g) < 0.4
    z = logits.clone().requires_grad_(True)
    ref_loss = cel_loss(z, token_A, expert_A, conflict_A, "neg_logit_ce")
    (ref_grad,) = torch.autograd.grad(0.3 * ref_loss, z)
    grad, loss = _cel_grad_neg_logit_ce(logits.float(), token_A, expert_A, conflict_A, 0.3)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.double(), ref_loss.detach().double(), rtol=1e-5, atol=1e-6)
    # no conflicts: no gradient, zero loss
    none = torch.zeros(A, dtype=torch.bool)
    grad0, loss0 = _cel_grad_neg_logit_ce(logits.float(), token_A, expert_A, none, 0.3)
    assert float(grad0.abs().max()) == 0.0 and float(loss0) == 0.0
