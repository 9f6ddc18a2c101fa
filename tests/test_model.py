"""AttentionBilinearNet: shapes, norms, layer equivalences, gradients, determinism."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from reid.model import AttentionBilinearNet, ModelConfig, TrainOutput, build_model, model_fingerprint
from reid.model.attention import LocationAttention
from reid.model.bilinear import LocalBilinear, _sqrt0
from reid.model.spatial_lstm import SpatialLSTM2d

SMALL = ModelConfig(input_size=(64, 32), c_a=8, c_b=6, d_x=24, d_h=10, d_att=12, num_glimpses=3, embed_dim=32)


@pytest.fixture(scope="module")
def default_model() -> AttentionBilinearNet:
    return build_model()


def test_default_config_and_grid():
    cfg = ModelConfig()
    assert cfg.input_size == (256, 128) and cfg.embed_dim == 512 and cfg.num_classes == 0
    assert cfg.grid == (16, 8)
    assert ModelConfig(output_stride=32).grid == (8, 4)
    assert ModelConfig(input_size=(250, 120)).grid == (16, 8)  # "same" padding rounds up
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown model config fields"):
        ModelConfig.from_dict({**cfg.to_dict(), "colour": 3})
    with pytest.raises(ValueError, match="output_stride"):
        ModelConfig(output_stride=8)


def test_default_model_embeddings_shape_and_norm(default_model):
    x = torch.rand(3, 3, 256, 128)
    before = x.clone()
    with torch.inference_mode():
        emb = default_model(x)
        maps = default_model.attention_maps(x)
    assert emb.shape == (3, 512) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.equal(x, before), "the model must not normalise the caller's tensor in place"
    assert maps.shape == (3, default_model.config.num_glimpses, 16, 8)
    assert torch.allclose(maps.sum(dim=(2, 3)), torch.ones(3, default_model.config.num_glimpses), atol=1e-5)
    assert (maps >= 0).all()
    # different crops get different embeddings and (slightly: the shipped fit starts each glimpse on a
    # horizontal stripe with a small content term, reid.train.distill.transfer_to_head) different attention
    assert not torch.allclose(emb[0], emb[1], atol=1e-3)
    assert (maps[0] - maps[1]).abs().max() > 1e-6
    assert not default_model.training


def test_odd_input_size_matches_derived_grid(default_model):
    with torch.inference_mode():
        maps = default_model.attention_maps(torch.rand(1, 3, 250, 120))
    assert maps.shape[2:] == ModelConfig(input_size=(250, 120)).grid


def test_forward_train_outputs_and_gradients_reach_every_part():
    model = build_model(SMALL.replace(num_classes=5), pretrained=False).train()
    x = torch.rand(4, 3, 64, 32)
    out = model.forward_train(x)
    assert isinstance(out, TrainOutput)
    assert out.features.shape == (4, 32) and out.logits.shape == (4, 5)
    assert out.attention.shape == (4, 3, 4, 2)
    loss = F.cross_entropy(out.logits, torch.tensor([0, 1, 2, 3])) + out.features.pow(2).mean()
    loss.backward()
    parts = {
        "stream A": model.stream_a.body[0][0].weight,
        "stream B": model.stream_b.conv_stem.weight,
        "bilinear reduce": model.bilinear.reduce_a[0].weight,
        "bilinear projection": model.bilinear.proj.weight,
        "lstm input": model.lstm.weight_x,
        "lstm recurrent": model.lstm.weight_h,
        "attention": model.attention.score.weight,
        "embedding": model.fc.weight,
        "classifier": model.classifier.weight,
    }
    for name, p in parts.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches the {name}"
    assert model.bnneck.bias.grad is None  # BNNeck shift stays frozen
    backbone = {id(p) for p in model.backbone_parameters()}
    head = {id(p) for p in model.head_parameters()}
    assert backbone and head and not (backbone & head)
    assert backbone | head == {id(p) for p in model.parameters()}


def test_no_classifier_gives_no_logits():
    model = build_model(SMALL, pretrained=False)
    assert model.classifier is None
    out = model.forward_train(torch.rand(2, 3, 64, 32))
    assert out.logits is None and out.features.shape == (2, 32)


def test_attention_maps_change_with_the_input():
    model = build_model(SMALL, pretrained=False)
    with torch.inference_mode():
        a = model.attention_maps(torch.rand(1, 3, 64, 32))
        b = model.attention_maps(torch.rand(1, 3, 64, 32))
    assert torch.allclose(a.sum(dim=(2, 3)), torch.ones(1, 3), atol=1e-6)
    assert (a - b).abs().max() > 1e-5


def reference_spatial_lstm(lstm: SpatialLSTM2d, x: torch.Tensor) -> torch.Tensor:
    """Plain cell-by-cell loop in raster order, one direction at a time."""
    b, gh, gw, _ = x.shape
    dh = lstm.d_h
    outs = []
    for d in range(lstm.directions):
        grid = x if d == 0 else x.flip(1, 2)
        h = [[torch.zeros(b, dh, dtype=x.dtype) for _ in range(gw)] for _ in range(gh)]
        c = [[torch.zeros(b, dh, dtype=x.dtype) for _ in range(gw)] for _ in range(gh)]
        zero = torch.zeros(b, dh, dtype=x.dtype)
        for i in range(gh):
            for j in range(gw):
                h_up, c_up = (h[i - 1][j], c[i - 1][j]) if i > 0 else (zero, zero)
                h_left, c_left = (h[i][j - 1], c[i][j - 1]) if j > 0 else (zero, zero)
                gates = (grid[:, i, j] @ lstm.weight_x[d] + torch.cat([h_up, h_left], 1) @ lstm.weight_h[d]
                         + lstm.bias[d])
                ig, f1, f2, og, g = gates.chunk(5, dim=1)
                c[i][j] = torch.sigmoid(f1) * c_up + torch.sigmoid(f2) * c_left + torch.sigmoid(ig) * torch.tanh(g)
                h[i][j] = torch.sigmoid(og) * torch.tanh(c[i][j])
        out = torch.stack([torch.stack(row, 1) for row in h], 1)  # [B,Gh,Gw,dh]
        outs.append(out if d == 0 else out.flip(1, 2))
    return torch.cat(outs, dim=-1)


@pytest.mark.parametrize("shape,directions", [((5, 3), 2), ((3, 5), 2), ((4, 4), 1), ((1, 6), 2), ((16, 8), 2)])
def test_anti_diagonal_lstm_equals_cell_by_cell_loop(shape, directions):
    torch.manual_seed(0)
    lstm = SpatialLSTM2d(7, 6, directions=directions).double()
    with torch.no_grad():
        lstm.bias.normal_()  # non-trivial biases too
    x = torch.randn(2, *shape, 7, dtype=torch.float64)
    fast = lstm(x)
    assert fast.shape == (2, *shape, 6 * directions)
    assert torch.allclose(fast, reference_spatial_lstm(lstm, x), atol=1e-12)


@pytest.mark.parametrize("directions", [2, 1])
def test_anti_diagonal_lstm_gradients_equal_the_cell_by_cell_loop(directions):
    # The scan splits its input gates once into the diagonals' blocks (a cheap backward pass); gradients
    # with respect to the input and every weight are those of the plain loop.
    torch.manual_seed(0)
    lstm = SpatialLSTM2d(7, 6, directions=directions).double()
    with torch.no_grad():
        lstm.bias.normal_()
    x = torch.randn(3, 5, 3, 7, dtype=torch.float64, requires_grad=True)
    grads = torch.autograd.grad(lstm(x).pow(2).sum(), [x, *lstm.parameters()])
    ref = torch.autograd.grad(reference_spatial_lstm(lstm, x).pow(2).sum(), [x, *lstm.parameters()])
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(grads, ref, strict=True))


def test_lstm_state_flows_from_top_left_and_bottom_right():
    torch.manual_seed(0)
    lstm = SpatialLSTM2d(4, 5, directions=2).double()
    x = torch.randn(1, 4, 3, 4, dtype=torch.float64)
    y = x.clone()
    y[0, 0, 0] += 1.0  # change the top-left cell only
    dx = (lstm(x) - lstm(y)).abs()
    fwd, bwd = dx[..., :5], dx[..., 5:]
    assert fwd[0, 3, 2].max() > 0  # the TL->BR scan carries it to the bottom-right corner
    assert bwd[0, 1:, 1:].max() == 0 and bwd[0, 0, 0].max() > 0  # the BR->TL scan only sees it at that cell


OPTIMIZERS = {"adam": lambda ps: torch.optim.Adam(ps, lr=0.1),
              # an L2 term under Adam moves a parameter by about lr per step even where its gradient is zero
              "adam-l2": lambda ps: torch.optim.Adam(ps, lr=0.1, weight_decay=5e-4),
              "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.5),
              "sgd-l2": lambda ps: torch.optim.SGD(ps, lr=0.5, momentum=0.9, weight_decay=0.5)}


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("directions", [2, 1])
def test_row_counter_counts_rows_whatever_the_input_and_stays_fixed_under_training(directions, optimizer):
    from reid.model.spatial_lstm import COUNTER_STEP

    torch.manual_seed(0)
    lstm = SpatialLSTM2d(7, 6, directions=directions, row_counter=True)
    x = torch.randn(4, 5, 3, 7)
    counter = lstm(x)[..., lstm.counter_unit]  # [B, Gh, Gw]
    rows = torch.arange(5, 0, -1) if directions == 2 else torch.arange(1, 6)  # the last scan runs bottom-up
    expected = torch.tanh(rows * COUNTER_STEP).view(1, 5, 1).expand_as(counter)
    assert torch.allclose(counter, expected, atol=1e-6)
    before = [p.detach().clone() for p in lstm.parameters()]
    opt = OPTIMIZERS[optimizer](lstm.parameters())
    for _ in range(3):
        opt.zero_grad()
        lstm(x).sum().backward()
        opt.step()
    assert torch.allclose(lstm(torch.randn(2, 5, 3, 7))[..., lstm.counter_unit], expected[:2], atol=1e-6)
    moved = [not torch.equal(a, b) for a, b in zip(before, lstm.parameters(), strict=True)]
    assert all(moved)  # the other units did train


def test_configs_saved_before_the_row_counter_load_without_it():
    doc = ModelConfig().to_dict()
    assert doc["row_counter"] is True
    del doc["row_counter"]
    assert ModelConfig.from_dict(doc).row_counter is False


def test_bilinear_equals_explicit_outer_product_per_location():
    torch.manual_seed(0)
    layer = LocalBilinear(5, 4, c_a=3, c_b=2, d_x=7).double().eval()
    with torch.no_grad():  # non-trivial BN statistics
        for bn in (layer.reduce_a[1], layer.reduce_b[1]):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
    a, b = torch.randn(2, 5, 3, 4, dtype=torch.float64), torch.randn(2, 4, 3, 4, dtype=torch.float64)
    out = layer(a, b)
    ra, rb = layer.reduce_a(a), layer.reduce_b(b)
    expected = torch.empty(2, 3, 4, 7, dtype=torch.float64)
    for n in range(2):
        for i in range(3):
            for j in range(4):
                z = torch.outer(ra[n, :, i, j], rb[n, :, i, j]).flatten()
                z = torch.sign(z) * torch.sqrt(z.abs())
                z = z / max(z.norm().item(), 1e-12)
                expected[n, i, j] = layer.proj.weight @ z + layer.proj.bias
    assert out.shape == (2, 3, 4, 7)
    assert torch.allclose(out, expected, atol=1e-6)


def test_bilinear_sqrt_is_exact_at_zero_with_finite_gradient():
    x = torch.tensor([0.0, 4.0, 9.0], requires_grad=True)
    y = _sqrt0(x)
    assert y[0].item() == 0.0 and torch.allclose(y, torch.tensor([0.0, 2.0, 3.0]), atol=1e-6)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    # a location where a whole reduced stream is zero gives a zero bilinear vector, as sign-sqrt + L2 does
    layer = LocalBilinear(2, 2, c_a=2, c_b=2, d_x=3).eval()
    with torch.no_grad():
        layer.reduce_a[0].weight.zero_()
    z = layer.outer(torch.randn(1, 2, 2, 2), torch.randn(1, 2, 2, 2))
    assert torch.count_nonzero(z) == 0


def test_attention_is_a_convex_combination_of_states():
    torch.manual_seed(0)
    att = LocationAttention(6, 5, d_att=4, glimpses=2).double()
    x, h = torch.randn(3, 10, 6, dtype=torch.float64), torch.randn(3, 10, 5, dtype=torch.float64)
    z, alpha = att(x, h)
    assert z.shape == (3, 10) and alpha.shape == (3, 2, 10)
    assert torch.allclose(alpha.sum(-1), torch.ones(3, 2, dtype=torch.float64))
    e = torch.tanh(x @ att.proj_x.weight.T + att.proj_x.bias + h @ att.proj_h.weight.T) @ att.score.weight.T
    expected_alpha = torch.softmax(e, dim=1)  # [B,L,K]
    expected_z = torch.einsum("blk,bld->bkd", expected_alpha, h).flatten(1)
    assert torch.allclose(alpha, expected_alpha.transpose(1, 2))
    assert torch.allclose(z, expected_z)


def test_build_is_deterministic_and_independent_of_global_rng():
    torch.manual_seed(1)
    a = build_model(SMALL, pretrained=False)
    state = torch.random.get_rng_state()
    torch.manual_seed(2)
    b = build_model(SMALL, pretrained=False)
    assert model_fingerprint(a) == model_fingerprint(b)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    torch.manual_seed(1)
    build_model(SMALL, pretrained=False)
    assert torch.equal(torch.random.get_rng_state(), state), "building must not consume the caller's RNG"
    assert model_fingerprint(build_model(SMALL.replace(seed=1), pretrained=False)) != model_fingerprint(a)


def test_fingerprint_stable_and_sensitive(default_model):
    fp = model_fingerprint(default_model)
    assert fp.startswith("abn-") and len(fp) == 20
    assert model_fingerprint(build_model()) == fp
    other = build_model()
    with torch.no_grad():
        other.fc.weight[0, 0] += 1e-3
    assert model_fingerprint(other) != fp
    assert model_fingerprint(build_model(ModelConfig(num_glimpses=1))) != fp
    # the same weights under another config are another model
    renamed = build_model()
    object.__setattr__(renamed, "config", renamed.config.replace(seed=7))
    assert model_fingerprint(renamed) != fp


def test_fused_inference_equals_the_trained_layers(default_model):
    from reid.model.fusion import ConvAct

    x = torch.rand(2, 3, 256, 128)
    with torch.no_grad():  # grad mode off but not inference mode: still the fused copy
        fused = default_model(x)
    with torch.enable_grad():
        plain = default_model(x)  # gradients wanted: the trained modules themselves
    assert torch.allclose(fused, plain.detach(), atol=1e-5)
    for size in ((250, 120), (255, 127), (96, 48)):  # odd and even sizes at every TF-"same" stride-2 conv
        x = torch.rand(1, 3, *size)
        with torch.no_grad():
            fused = default_model(x)
        with torch.enable_grad():
            plain = default_model(x).detach()
        assert torch.allclose(fused, plain, atol=1e-5), size
    with torch.inference_mode():
        a, b, bil = default_model._front()
    assert a is not default_model.stream_a and not any(isinstance(m, torch.nn.BatchNorm2d) for m in a.modules())
    assert sum(isinstance(m, ConvAct) for m in a.modules()) > 30
    assert "_folded" not in " ".join(default_model.state_dict())  # never saved


def test_fused_copy_follows_weight_changes():
    model = build_model(SMALL, pretrained=False)
    x = torch.rand(2, 3, 64, 32)
    with torch.inference_mode():
        before = model(x)
    with torch.no_grad():
        model.stream_a.body[0][1].running_mean.add_(0.5)  # an in-place change, as an optimiser makes
        model.bilinear.reduce_b[0].weight.mul_(-1.0)
    with torch.inference_mode():
        after = model(x)
    with torch.enable_grad():
        expected = model(x).detach()
    assert not torch.allclose(before, after, atol=1e-4)
    assert torch.allclose(after, expected, atol=1e-5)
    other = build_model(SMALL.replace(seed=3), pretrained=False)
    model.load_state_dict(other.state_dict())
    with torch.inference_mode():
        assert torch.allclose(model(x), other(x), atol=1e-5)


def test_network_ignores_a_callers_autocast_unless_allowed():
    model = build_model(SMALL, pretrained=False)
    x = torch.rand(2, 3, 64, 32)
    with torch.inference_mode():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            emb = model(x)
            out = model.forward_train(x)
        assert emb.dtype == torch.float32 and out.features.dtype == torch.float32
        assert torch.equal(emb, ref)  # bf16 would change the embeddings (see bench_model.py)
        assert torch.allclose(out.attention.sum(dim=(2, 3)), torch.ones(2, 3), atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16), model.run_mode(streams_autocast=True):
            low = model(x)
        assert low.dtype == torch.float32 and not torch.equal(low, ref)
        assert torch.equal(model(x), ref)  # the mode ended with its block


def test_head_is_cheap_relative_to_streams():
    # the default head (bilinear + LSTM + attention + embedding) must stay well below the streams' cost
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(pretrained=False)
    model.eval()
    x = torch.rand(1, 3, 256, 128)
    with torch.inference_mode(), model.run_mode(fused=False):  # FlopCounterMode sees aten convs only
        with FlopCounterMode(display=False) as streams:
            model.stream_a(x), model.stream_b(x)
        with FlopCounterMode(display=False) as total:
            model(x)
    head = total.get_total_flops() - streams.get_total_flops()
    assert 0 < head < 0.5 * streams.get_total_flops(), (head, streams.get_total_flops())
    assert math.isfinite(head)
