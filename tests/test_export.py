"""The compact export: an exact round trip, its size, one clear error per damaged file; and
the ONNX export checked with onnxruntime."""

import json

import pytest
import torch
from torch import nn

from pipeline.edges.export import load_compact, onnx_bytes, onnx_check, save_compact
from pipeline.errors import PipelineError
from pipeline.nn.layers import prunable_numel
from pipeline.nn.models import build_model
from pipeline.pruning.masking import apply_masks, magnitude_masks
from tests.models_zoo import TinyDenseNet, TinyMLP, TinyResNet, randomized

ZOO = {
    "resnet": lambda: randomized(TinyResNet()),
    "densenet": lambda: randomized(TinyDenseNet()),
    "mlp": lambda: randomized(TinyMLP()),
    "digits_cnn": lambda: randomized(build_model("digits_cnn", 1, 10)),
    "cifar_resnet20": lambda: build_model("cifar_resnet20", 3, 10),
}


def pruned(build, sparsity):
    model = build()
    keep = {n: k - int(round(k * sparsity)) for n, k in prunable_numel(model).items()}
    apply_masks(model, magnitude_masks(model, keep))
    return model


def raw(t):
    return t.contiguous().reshape(-1).view(torch.uint8)


def identical(a, b):
    return list(a) == list(b) and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(raw(a[k]), raw(b[k]))
        for k in a
    )


@pytest.mark.parametrize("case", sorted(ZOO))
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_round_trip_is_bit_exact_and_smaller(case, sparsity, tmp_path):
    model = pruned(ZOO[case], sparsity)
    state = model.state_dict()
    packed = [f"{n}.weight" for n in prunable_numel(model)]
    state[packed[0]].view(-1)[0] = -0.0  # a negative zero comes back as one
    size = save_compact(tmp_path / "m.safetensors", state, packed)
    assert size == (tmp_path / "m.safetensors").stat().st_size
    back = load_compact(tmp_path / "m.safetensors")
    assert identical(back, state)
    assert torch.signbit(back[packed[0]].view(-1)[0])
    # smaller than the dense tensors by (1 - sparsity) of the packed ones, up to the masks
    # (a bit per weight) and the JSON header
    dense = sum(v.numel() * v.element_size() for v in state.values())
    packed_bytes = sum(state[n].numel() * state[n].element_size() for n in packed)
    masks = sum((state[n].numel() + 7) // 8 + 1 for n in packed)
    masks += (state[packed[0]].numel() + 7) // 8  # the sign bits of the first one's zeros
    header = int.from_bytes((tmp_path / "m.safetensors").read_bytes()[:8], "little") + 8
    zeros = sum(int((state[n] == 0).sum()) for n in packed)
    assert zeros >= sparsity * sum(state[n].numel() for n in packed) - len(packed)
    bound = dense - packed_bytes * zeros / sum(state[n].numel() for n in packed) + masks + header
    assert size <= bound + 16


def test_half_precision_values_restore_the_original_dtype(tmp_path):
    model = pruned(ZOO["digits_cnn"], 0.8)
    state = model.state_dict()
    packed = [f"{n}.weight" for n in prunable_numel(model)]
    full = save_compact(tmp_path / "a.safetensors", state, packed)
    half = save_compact(tmp_path / "b.safetensors", state, packed, torch.float16)
    back = load_compact(tmp_path / "b.safetensors")
    assert half < full
    for k, v in state.items():
        assert back[k].dtype == v.dtype
        torch.testing.assert_close(back[k], v, rtol=1e-3, atol=1e-4)
        if k in packed:
            assert torch.equal(back[k] == 0, v == 0)  # the mask is exact


def test_the_file_is_standard_safetensors(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    model = pruned(ZOO["resnet"], 0.7)
    save_compact(tmp_path / "m.safetensors", model.state_dict(), ["stem.weight"])
    tensors = safetensors.load_file(tmp_path / "m.safetensors")
    assert "stem.weight.__mask__" in tensors and "linear.weight" in tensors


def damaged(tmp_path, how):
    model = pruned(ZOO["resnet"], 0.7)
    path = tmp_path / "m.safetensors"
    save_compact(path, model.state_dict(), [f"{n}.weight" for n in prunable_numel(model)])
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "short":
        data = data[:5]
    elif how == "length":
        data[:8] = (len(data) * 4).to_bytes(8, "little")
    elif how == "json":
        data[8:12] = b"\xff\xfe{["
    elif how == "nested":
        text = b"[" * 200_000
        data = len(text).to_bytes(8, "little") + text
    elif how == "duplicate":
        text = data[8 : 8 + n].rstrip()[:-1] + b',"linear.bias":{"dtype":"F32","shape":[1]}}'
        text += b" " * (-len(text) % 8)
        data = len(text).to_bytes(8, "little") + text + data[8 + n :]
    else:
        if how == "values":  # one value fewer than the mask says
            entry = header["stem.weight.__values__"]
            entry["shape"] = [entry["shape"][0] - 1]
            entry["data_offsets"][1] -= 4
        elif how == "overlap":  # the bias reads bytes of another tensor
            bias = header["linear.bias"]
            bias["data_offsets"] = [0, bias["data_offsets"][1] - bias["data_offsets"][0]]
        elif how == "float shape":
            header["linear.bias"]["shape"] = [float(header["linear.bias"]["shape"][0])]
        elif how == "order":  # a tensor the key order leaves out
            order = json.loads(header["__metadata__"]["order"])
            header["__metadata__"]["order"] = json.dumps(order[:-1])
        elif how == "metadata":
            header["__metadata__"] = ["not", "an", "object"]
        else:
            header["__metadata__"]["format"] = "something-else"
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        data = len(text).to_bytes(8, "little") + text + data[8 + n :]
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(
    "how",
    [
        "truncated",
        "short",
        "length",
        "json",
        "values",
        "format",
        "nested",
        "duplicate",
        "overlap",
        "float shape",
        "order",
        "metadata",
    ],
)
def test_a_damaged_file_is_one_clear_error_naming_it(how, tmp_path):
    path = damaged(tmp_path, how)
    with pytest.raises(PipelineError, match=rf"^compact model file {path}: "):
        load_compact(path)


def test_a_missing_file_is_one_clear_error(tmp_path):
    with pytest.raises(PipelineError, match="compact model file not found"):
        load_compact(tmp_path / "nothing.safetensors")


class Digits(torch.utils.data.Dataset):
    def __init__(self, n=40):
        self.x = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], 0


def test_onnx_logits_match_pytorch(caplog):
    model = pruned(ZOO["digits_cnn"], 0.8).eval()
    caplog.set_level("INFO")
    data = onnx_bytes(model, torch.randn(2, 1, 8, 8))
    # the exporter's graph passes ("Removed 38 unused nodes", ...) are not the user's news
    assert not [r for r in caplog.records if r.name.startswith(("onnx", "torch"))]
    worst = onnx_check(model, data, Digits(), batch_size=16)  # batches of 16, 16 and 8
    assert 0 <= worst <= 1e-4


class Singular(nn.Module):
    """Singular values: no ONNX operator computes them."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return torch.linalg.svdvals(self.fc(x).view(-1, 2, 2)).reshape(x.shape[0], 2)


def test_a_model_onnx_cannot_express_is_one_clear_error():
    expected = (
        r"^export: ONNX export of the model failed \(DispatchError: .*svd.*export\.onnx: false"
    )
    with pytest.raises(PipelineError, match=expected):
        onnx_bytes(Singular().eval(), torch.randn(2, 4))
