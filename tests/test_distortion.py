import numpy as np
import pytest
import torch
from torch import nn

from pipeline.nn.evaluation import output_distortion, predict_logits
from pipeline.profiling.distortion import profile_layer, sparsity_grid


def tiny_linear() -> nn.Module:
    model = nn.Sequential(nn.Linear(3, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.1, -1.0]]))
    return model.eval()


def test_grid():
    assert sparsity_grid(5).tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_profile_matches_hand_computation():
    model = tiny_linear()
    inputs = torch.tensor([[1.0, 1.0, 1.0], [2.0, 0.0, -2.0]])
    reference = predict_logits(model, inputs, 8)
    mean, worst = profile_layer(
        "0",
        model=model,
        inputs=inputs,
        reference=reference,
        sparsities=sparsity_grid(3),
        batch_size=1,
        threads=1,
    )
    # s = 0.5 zeroes |w| = 0.1, 0.5 and the first tied 1.0 (index 0): the logit error is
    # [[1, 0, .5], [0, .1, 0]] @ x -> sample 1: (1.5, 0.1) -> 1.13; sample 2: (1, 0) -> 0.5.
    # s = 1 zeroes everything, the error is W @ x: (-0.5, 2.1) -> 2.33; (1, 8) -> 32.5.
    np.testing.assert_allclose(mean, [0.0, (1.13 + 0.5) / 2, (2.33 + 32.5) / 2], rtol=1e-6)
    np.testing.assert_allclose(worst, [0.0, 1.13, 32.5], rtol=1e-6)


def test_zero_at_sparsity_zero_and_weights_restored():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 5)
    ).eval()
    inputs = torch.randn(10, 1, 4, 4)
    reference = predict_logits(model, inputs, 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for layer in ("0", "3"):
        mean, worst = profile_layer(
            layer,
            model=model,
            inputs=inputs,
            reference=reference,
            sparsities=sparsity_grid(6),
            batch_size=4,
            threads=1,
        )
        assert mean[0] == 0.0 and worst[0] == 0.0
        assert (mean[1:] > 0).all() and (worst >= mean).all()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_output_distortion_is_mean_and_max_of_per_sample_mse():
    logits = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    reference = torch.tensor([[0.0, 0.0], [0.0, 3.0]])
    mean, worst = output_distortion(logits, reference)
    assert mean == pytest.approx((2.5 + 4.5) / 2) and worst == pytest.approx(4.5)
