"""CKA against a plain float64 implementation of the formulas, and by its properties."""

import math

import pytest
import torch

from prunetune.analysis.cka import CKAAccumulator, cka_matrix


def reference_hsic_biased(x, y):
    n = x.shape[0]
    k, g = x @ x.T, y @ y.T  # the two Gram matrices (K and L in the papers)
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    return torch.trace(k @ h @ g @ h) / (n - 1) ** 2


def reference_hsic_unbiased(x, y):
    n = x.shape[0]
    k, g = x @ x.T, y @ y.T
    k = k - torch.diag(torch.diag(k))
    g = g - torch.diag(torch.diag(g))
    one = torch.ones(n, 1, dtype=torch.float64)
    term = torch.trace(k @ g) + (one.T @ k @ one) * (one.T @ g @ one) / ((n - 1) * (n - 2)) \
        - 2.0 / (n - 2) * (one.T @ k @ g @ one)
    return (term / (n * (n - 3))).item()


def reference_cka(feats_a, feats_b, batch_size=None):
    """One pair at a time, straight from the formulas."""
    out = torch.zeros(len(feats_a), len(feats_b), dtype=torch.float64)
    for i, a in enumerate(feats_a):
        for j, b in enumerate(feats_b):
            a2, b2 = a.reshape(len(a), -1).double(), b.reshape(len(b), -1).double()
            if batch_size is None:
                out[i, j] = reference_hsic_biased(a2, b2) / math.sqrt(
                    reference_hsic_biased(a2, a2) * reference_hsic_biased(b2, b2))
            else:
                xy = xx = yy = 0.0
                for s in range(0, len(a2), batch_size):
                    xa, xb = a2[s:s + batch_size], b2[s:s + batch_size]
                    if len(xa) < 4:
                        break
                    xy += reference_hsic_unbiased(xa, xb)
                    xx += reference_hsic_unbiased(xa, xa)
                    yy += reference_hsic_unbiased(xb, xb)
                out[i, j] = xy / math.sqrt(xx * yy)
    return out


def features(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 10, generator=g)
    return [base @ torch.randn(10, 20, generator=g),                       # linear in base
            torch.relu(base @ torch.randn(10, 30, generator=g)).view(n, 5, 6),  # a conv-like shape
            torch.randn(n, 15, generator=g),                                # unrelated
            base[:, :3] ** 2]


@pytest.mark.parametrize("batch_size", [None, 16, 20])
def test_matches_reference(batch_size):
    a, b = features(seed=0), features(seed=1)[:3]
    ours = cka_matrix(a, b, batch_size=batch_size, dtype=torch.float64)  # the formulas, exactly
    assert ours.dtype == torch.float64 and ours.shape == (4, 3)
    torch.testing.assert_close(ours, reference_cka(a, b, batch_size), rtol=1e-9, atol=1e-9)
    fast = cka_matrix(a, b, batch_size=batch_size)  # Grams in the features' float32
    torch.testing.assert_close(fast, reference_cka(a, b, batch_size), rtol=0, atol=1e-5)


@pytest.mark.parametrize("batch_size", [None, 16])
def test_self_comparison_is_symmetric_with_unit_diagonal(batch_size):
    a = features()
    m = cka_matrix(a, batch_size=batch_size)
    torch.testing.assert_close(m, m.T)
    torch.testing.assert_close(torch.diagonal(m), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(m, cka_matrix(a, a, batch_size=batch_size))


@pytest.mark.parametrize("batch_size", [None, 16])
def test_invariant_to_orthogonal_transforms_and_isotropic_scaling(batch_size):
    a = [x.reshape(len(x), -1).double() for x in features()]  # float64: the transform adds no rounding
    q, _ = torch.linalg.qr(torch.randn(20, 20, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    transformed = [a[0] @ q * 7.5] + [x * 0.01 for x in a[1:]]
    torch.testing.assert_close(cka_matrix(a, batch_size=batch_size),
                               cka_matrix(transformed, batch_size=batch_size), rtol=1e-7, atol=1e-9)


def test_biased_values_in_unit_interval():
    m = cka_matrix(features(n=40), features(n=40, seed=5))
    assert (m >= 0).all() and (m <= 1 + 1e-12).all()


def test_accumulator_equals_one_shot_minibatches():
    a, b = features(n=48), features(n=48, seed=2)
    acc = CKAAccumulator()
    for s in range(0, 48, 16):
        acc.update([x[s:s + 16] for x in a], [x[s:s + 16] for x in b])
    torch.testing.assert_close(acc.result(), cka_matrix(a, b, batch_size=16))


def test_degenerate_layer_gives_zero_not_nan():
    a = features(n=32) + [torch.ones(32, 8)]
    m = cka_matrix(a, batch_size=16)
    assert not torch.isnan(m).any()
    assert (m[-1] == 0).all() and (m[:, -1] == 0).all()


def test_clear_errors():
    a = features(n=32)
    with pytest.raises(ValueError, match="samples"):
        cka_matrix(a, [torch.randn(31, 4)])
    with pytest.raises(ValueError, match="at least 4"):
        cka_matrix(a, batch_size=3)
    with pytest.raises(ValueError, match="at least 4"):
        cka_matrix([x[:3] for x in a], batch_size=8)
    with pytest.raises(ValueError, match="empty"):
        cka_matrix([])


@pytest.mark.parametrize("batch_size", [None, 16])
def test_a_nearly_constant_layer_is_an_ordinary_layer(batch_size):
    """5 + small noise (std/mean 0.003): CKA ignores offsets, so it is 1 against itself and
    against a rotated copy, and its similarity to others is that of the noise alone."""
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(64, 12, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    nearly = 5.0 + 0.015 * noise
    rotated = 5.0 + 0.015 * noise @ q
    for dtype in (torch.float64, torch.float32):
        m = cka_matrix([nearly.to(dtype), rotated.to(dtype), noise.to(dtype)], batch_size=batch_size)
        torch.testing.assert_close(m, torch.ones(3, 3, dtype=torch.float64), rtol=0, atol=1e-5)


@pytest.mark.parametrize("batch_size", [None, 16])
def test_float32_features_within_1e5_of_float64(batch_size):
    g = torch.Generator().manual_seed(2)
    base = torch.randn(96, 32, generator=g)
    feats = [torch.tanh(base @ torch.randn(32, 512, generator=g)) + 3.0 * i for i in range(4)]  # offsets too
    reference = cka_matrix([f.double() for f in feats], batch_size=batch_size)
    fast = cka_matrix(feats, batch_size=batch_size)  # Grams in float32
    forced = cka_matrix(feats, batch_size=batch_size, dtype=torch.float64)
    torch.testing.assert_close(fast, reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(forced, reference, rtol=0, atol=1e-12)
    assert fast.dtype == torch.float64 and not torch.equal(fast, reference)  # really float32 Grams


def test_each_run_sees_inputs_normalised_as_it_was_trained(tmp_path):
    """prunetune cka: a run from ImageNet weights gets ImageNet's statistics, a run trained from
    scratch its training split's, whatever the first run compared used."""
    import yaml

    from prunetune import spec
    from prunetune.analysis import similarity
    from prunetune.data.device import IMAGENET_MEAN, IMAGENET_STD
    from prunetune.models import build_model

    from conftest import write_cifar10

    root = write_cifar10(tmp_path / "cifar")
    raw = {"name": "c", "model": {"arch": "simple_cnn"},
           "data": {"dataset": "cifar10", "root": str(root), "image_size": 8}}
    scratch = spec.validate(raw).model_dump(mode="json")
    weights = {"arch": "simple_cnn", "weights": str(tmp_path / "w.pth")}
    imagenet = spec.validate({**raw, "model": weights}).model_dump(mode="json")
    (tmp_path / "scratch.yaml").write_text(yaml.safe_dump(scratch))
    (tmp_path / "imagenet.yaml").write_text(yaml.safe_dump(imagenet))
    torch.save(build_model(spec.validate(raw).model, 10, 3, 8).state_dict(), tmp_path / "model.pt")
    dataset, batches = similarity.eval_batches(spec.validate(raw), 32, 16)
    runs = [similarity.load_checkpoint(name, tmp_path / f"{name}.yaml", tmp_path / "model.pt", dataset)
            for name in ("imagenet", "scratch")]  # the ImageNet one first
    x = batches[0]
    assert x.dtype == torch.uint8
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    torch.testing.assert_close(runs[0].inputs(x), (x.float() - mean) / std)
    train = torch.from_numpy(dataset.part("train")[0]).double()
    own = (x.double() - train.mean(dim=(0, 2, 3)).view(1, 3, 1, 1)) / train.std(dim=(0, 2, 3)).view(1, 3, 1, 1)
    torch.testing.assert_close(runs[1].inputs(x), own.float(), rtol=1e-5, atol=1e-5)
    seen = {}
    for run in runs:
        run.model.features[0].register_forward_pre_hook(lambda m, args, name=run.label: seen.setdefault(name, args[0]))
    similarity.cka_matrices(runs, batches)
    torch.testing.assert_close(seen["imagenet"], runs[0].inputs(x))
    torch.testing.assert_close(seen["scratch"], runs[1].inputs(x))


class _SharedLayer(torch.nn.Module):
    """One Linear called twice in a forward (on x, then on x²), then a head."""

    def __init__(self):
        super().__init__()
        self.shared = torch.nn.Linear(6, 5)
        self.head = torch.nn.Linear(10, 3)

    def forward(self, x):
        return self.head(torch.cat([self.shared(x), self.shared(x * x)], dim=1))


def test_a_layer_called_twice_is_compared_by_both_calls_outputs():
    from prunetune.analysis import similarity

    torch.manual_seed(0)
    model = _SharedLayer().eval()
    run = similarity.Checkpoint("a", None, model, ["shared", "head"], torch.zeros(1), torch.ones(1))
    x = torch.randn(48, 6)
    with torch.no_grad():
        both = torch.cat([model.shared(x), model.shared(x * x)], dim=1)
        head = model(x)
    matrix = similarity.cka_matrices([run], [x[:24], x[24:]])[0, 0]
    expected = reference_cka([both, head], [both, head], batch_size=24)
    torch.testing.assert_close(matrix.double(), expected, rtol=0, atol=1e-5)


def test_heatmap_cells_show_their_values_where_they_can_be_read(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    from prunetune.analysis import similarity

    written = []
    text = Axes.text

    def recorded(self, x, y, s, **kw):
        written.append((x, y, s))
        return text(self, x, y, s, **kw)

    monkeypatch.setattr(Axes, "text", recorded)
    matrix = torch.tensor([[1.0, 0.25], [0.5, 0.125], [0.0, 0.75]])
    similarity.heatmap(tmp_path / "small.png", matrix, ["a", "b", "c"], ["x", "y"], "t", "cols", "rows")
    assert sorted(written) == sorted([(0, 0, "1.00"), (1, 0, "0.25"), (0, 1, "0.50"), (1, 1, "0.12"),
                                      (0, 2, "0.00"), (1, 2, "0.75")])
    written.clear()
    big = similarity.ANNOTATED + 1
    similarity.heatmap(tmp_path / "big.png", torch.rand(big, big), [str(i) for i in range(big)],
                       [str(i) for i in range(big)], "t", "cols", "rows")
    assert written == [] and (tmp_path / "big.png").stat().st_size > 0
