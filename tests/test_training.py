import torch
from torch.utils.data import TensorDataset

from pipeline.config.sections import TrainParams
from pipeline.nn.models import build_model
from pipeline.nn.training import train
from pipeline.pruning.masking import apply_masks, magnitude_masks, masks_from_zeros


def test_masked_training_keeps_pruned_weights_exactly_zero():
    torch.manual_seed(0)
    model = build_model("digits_cnn", 1, 10)
    kept = {"conv1": 72, "conv2": 460, "conv3": 12900, "conv4": 11000, "fc": 256}
    masks = magnitude_masks(model, kept)
    apply_masks(model, masks)
    data = TensorDataset(torch.randn(96, 1, 8, 8), torch.randint(0, 10, (96,)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # momentum and weight decay both on: neither may move a pruned weight
    history = train(
        model,
        data,
        TrainParams(epochs=2, batch_size=16, lr=0.1, momentum=0.9, weight_decay=0.01),
        seed=0,
        masks=masks,
    )
    assert len(history) == 2 and all(h.accuracy is None for h in history)
    after = masks_from_zeros(model)
    for name, mask in masks.items():
        assert torch.equal(after[name], mask), name  # zeros stay, kept weights stay non-zero
    assert not torch.equal(before["conv2.weight"], model.state_dict()["conv2.weight"])  # it trained


def test_training_is_deterministic_for_a_seed():
    data = TensorDataset(torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,)))
    states = []
    for _ in range(2):
        torch.manual_seed(3)
        model = build_model("digits_cnn", 1, 10)
        train(model, data, TrainParams(epochs=1, batch_size=16), seed=3)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
