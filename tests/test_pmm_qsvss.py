"""QuadSnake routes, cross scan/merge, the QSVSS block and the PMM stack."""
import io

import pytest
import torch
import torch.nn as nn

from pmm_qsvss import PerModalMamba, QSVSSBlock, cross_merge, cross_scan, quadsnake_routes

# Hand-written expected routes (flat index i*W + j).
EXPECTED = {
    (3, 4): [
        [0, 1, 2, 3, 7, 6, 5, 4, 8, 9, 10, 11],
        [11, 10, 9, 8, 4, 5, 6, 7, 3, 2, 1, 0],
        # s=0: (0,0); s=1 odd, i desc: (1,0),(0,1); s=2 even: (0,2),(1,1),(2,0); s=3 odd: (2,1),(1,2),(0,3);
        # s=4 even: (1,3),(2,2); s=5: (2,3)
        [0, 4, 1, 2, 5, 8, 9, 6, 3, 7, 10, 11],
        [11, 10, 7, 3, 6, 9, 8, 5, 2, 1, 4, 0],
    ],
    (1, 5): [
        [0, 1, 2, 3, 4],
        [4, 3, 2, 1, 0],
        [0, 1, 2, 3, 4],
        [4, 3, 2, 1, 0],
    ],
    (5, 1): [
        [0, 1, 2, 3, 4],
        [4, 3, 2, 1, 0],
        [0, 1, 2, 3, 4],
        [4, 3, 2, 1, 0],
    ],
    (4, 4): [
        [0, 1, 2, 3, 7, 6, 5, 4, 8, 9, 10, 11, 15, 14, 13, 12],
        [12, 13, 14, 15, 11, 10, 9, 8, 4, 5, 6, 7, 3, 2, 1, 0],
        # s=0 (0,0); s=1 (1,0)(0,1); s=2 (0,2)(1,1)(2,0); s=3 (3,0)(2,1)(1,2)(0,3);
        # s=4 (1,3)(2,2)(3,1); s=5 (3,2)(2,3); s=6 (3,3)
        [0, 4, 1, 2, 5, 8, 12, 9, 6, 3, 7, 10, 13, 14, 11, 15],
        [15, 11, 14, 13, 10, 7, 3, 6, 9, 12, 8, 5, 2, 1, 4, 0],
    ],
}


@pytest.mark.parametrize("hw", list(EXPECTED))
def test_routes_match_hand_written(hw):
    routes = quadsnake_routes(*hw)
    assert routes.dtype == torch.long and routes.shape == (4, hw[0] * hw[1])
    assert routes.tolist() == EXPECTED[hw]


@pytest.mark.parametrize("hw", [(1, 1), (2, 7), (9, 3), (6, 6), (13, 11)])
def test_routes_are_snakes_and_permutations(hw):
    H, W = hw
    routes = quadsnake_routes(H, W)
    for k in range(4):
        assert sorted(routes[k].tolist()) == list(range(H * W))
    # Routes 0/1 move to a 4-neighbour at every step (a snake never jumps).
    i, j = routes[0] // W, routes[0] % W
    assert ((i[1:] - i[:-1]).abs() + (j[1:] - j[:-1]).abs() <= 1).all()
    assert torch.equal(routes[1], routes[0].flip(0)) and torch.equal(routes[3], routes[2].flip(0))
    assert quadsnake_routes(H, W) is routes  # cached


def test_merge_of_scan_is_exactly_four_x():
    x = torch.randn(2, 5, 7, 9)
    seq = cross_scan(x)
    assert seq.shape == (2, 4, 5, 63)
    assert torch.equal(cross_merge(seq, 7, 9), 4 * x)


def test_block_shapes_and_gradients():
    blk = QSVSSBlock(32, d_state=8)
    x = torch.randn(2, 32, 7, 9, requires_grad=True)
    y = blk(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.square().mean().backward()
    for name, p in blk.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient for {name}"
    assert x.grad is not None


def test_mamba_initialisation():
    blk = QSVSSBlock(64, d_state=16)
    assert blk.dt_rank == 4 and blk.d_inner == 128
    assert torch.allclose(torch.exp(blk.ssm.A_log[0]), torch.arange(1, 17).float())
    dt = torch.nn.functional.softplus(blk.ssm.dt_proj_bias)
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6
    assert blk.ssm.x_proj_weight.shape == (4, 4 + 32, 128)  # per-route parameters, registered


def test_sequential_routes_match_parallel():
    blk = QSVSSBlock(16, d_state=4).eval()
    x = torch.randn(2, 16, 6, 5)
    y_par = blk(x)
    blk.route_mode = "sequential"
    torch.testing.assert_close(blk(x), y_par, rtol=1e-5, atol=1e-5)


def test_state_dict_round_trip():
    blk = QSVSSBlock(16, d_state=4, norm="bn").eval()
    x = torch.randn(1, 16, 5, 6)
    buf = io.BytesIO()
    torch.save(blk.state_dict(), buf)
    buf.seek(0)
    fresh = QSVSSBlock(16, d_state=4, norm="bn").eval()
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(fresh(x), blk(x))


def test_pmm_stack_and_bad_arguments():
    pmm = PerModalMamba(16, depth=3, d_state=4, drop_path=[0.0, 0.05, 0.1])
    assert len(pmm.blocks) == 3 and isinstance(pmm.blocks, nn.ModuleList)
    assert pmm(torch.randn(2, 16, 4, 4)).shape == (2, 16, 4, 4)
    with pytest.raises(ValueError, match="route_mode"):
        QSVSSBlock(16, route_mode="zigzag")
    with pytest.raises(ValueError, match="norm"):
        QSVSSBlock(16, norm="xx")


class _Copier(nn.Module):
    def __init__(self, body, ch):
        super().__init__()
        self.inp = nn.Conv2d(1, ch, 1)
        self.body = body
        self.out = nn.Conv2d(ch, 1, 1)

    def forward(self, x):
        return self.out(self.body(self.inp(x)))


def _impulses(n, g):
    # Antithetic pairs (v, -v): the batch mean of v is exactly 0, so the gradient of the position-only part of
    # the prediction carries no sampling noise that would drown the weak long-range signal at initialisation.
    x = torch.zeros(n, 1, 8, 8)
    v = torch.randn(n // 2, generator=g)
    x[:, 0, 0, 0] = torch.cat([v, -v])
    return x


def _train_copier(model, steps=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(steps):
        x = _impulses(32, g)
        loss = (model(x)[:, 0, 7, 7] - x[:, 0, 0, 0]).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    x = _impulses(256, g)
    with torch.no_grad():
        return (model(x)[:, 0, 7, 7] - x[:, 0, 0, 0]).square().mean().item()


@pytest.mark.slow
def test_pmm_learns_long_range_copy_that_convs_cannot():
    """Copy the value of pixel (0, 0) to the opposite corner (7, 7) of an otherwise empty 8x8 map: a 2-block
    PMM sees the whole map, a 2-layer 3x3 conv stack only a 5x5 window (its loss stays at the target's
    variance, 1)."""
    torch.manual_seed(0)
    pmm = _Copier(PerModalMamba(16, depth=2, d_state=8), 16)
    conv = _Copier(nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.GELU(),
                                 nn.Conv2d(16, 16, 3, padding=1), nn.GELU()), 16)
    loss_pmm, loss_conv = _train_copier(pmm), _train_copier(conv)
    assert loss_conv > 0.8, loss_conv
    assert loss_pmm < 0.5 * loss_conv, (loss_pmm, loss_conv)


def test_qsvss_and_cmi_share_one_mixer_and_cmi_steers_with_the_partner():
    from cross_mamba_cmi import CrossMambaInteraction
    from pmm_qsvss import QuadSnakeMixer
    torch.manual_seed(0)
    cmi = CrossMambaInteraction(16, d_state=4, gate_init=1.0)
    assert isinstance(cmi.rgb.mixer, QuadSnakeMixer) and isinstance(QSVSSBlock(16).mixer, QuadSnakeMixer)
    a, b = torch.randn(2, 16, 6, 5), torch.randn(2, 16, 6, 5)
    mixer = cmi.rgb.mixer
    x, z = mixer.tokens(cmi.rgb.norm(a.permute(0, 2, 3, 1)))
    # steered by itself, the mixer is exactly a QSVSS block's; steered by the partner, it differs
    assert torch.equal(mixer(x, z), mixer(x, z, steer=x))
    out_rgb, _ = cmi(a, b)
    partner = cmi.aux.mixer.tokens(cmi.aux.norm(b.permute(0, 2, 3, 1)))[0]   # the partner's own tokens
    assert torch.allclose(out_rgb, a + (mixer(x, z, steer=partner) * cmi.rgb.gate).permute(0, 3, 1, 2), atol=1e-6)
    assert not torch.allclose(out_rgb, a + (mixer(x, z) * cmi.rgb.gate).permute(0, 3, 1, 2), atol=1e-4)


def test_sequential_routes_match_parallel_with_a_partner():
    from pmm_qsvss import QuadSnakeMixer
    torch.manual_seed(1)
    par = QuadSnakeMixer(8, 8, 4, 1)
    seq = QuadSnakeMixer(8, 8, 4, 1, route_mode="sequential")
    seq.load_state_dict(par.state_dict())
    x, s = torch.randn(2, 8, 5, 7), torch.randn(2, 8, 5, 7)
    z = torch.randn(2, 5, 7, 8)
    assert torch.allclose(par(x, z, steer=s), seq(x, z, steer=s), atol=1e-5)
