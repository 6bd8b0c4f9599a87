"""SteeringVector and difference SVD, against independent numpy / gguf references."""

import json
import warnings

import gguf
import jaxtyping
import numpy as np
import pytest
import torch

from mahals._version import __version__

# Like conftest.py does for the rest of mahals: jaxtyping + beartype check every shape annotation
# of mahals.steering while these tests run (a no-op if another test module imported it first).
with jaxtyping.install_import_hook("mahals.steering", "beartype.beartype"):
    from mahals.steering import (
        DifferenceSVD,
        SteeringVector,
        difference_svd,
        extract_pair_vectors,
        mean_cosine_per_layer,
    )


def _random_vector(layers=(0, 1, 2), d_model=6, seed=0, **metadata) -> SteeringVector:
    generator = torch.Generator().manual_seed(seed)
    vectors = torch.randn(len(layers), d_model, generator=generator)
    return SteeringVector(vectors=vectors, layers=layers, **metadata)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ------------------------------------------------------------------------------------ from_diff


def test_from_diff_matches_float64_reference():
    # Large, cancelling values: a float32 accumulation is off by ~1e-3, far above 1 ulp of the
    # mean, so only a float64 accumulation passes.
    rng = np.random.default_rng(0)
    h_base = rng.normal(0.0, 1e4, size=(10_000, 2, 16)).astype(np.float32)
    h_tuned = rng.normal(0.37, 1e4, size=(10_000, 2, 16)).astype(np.float32)
    reference = (h_tuned.astype(np.float64) - h_base.astype(np.float64)).mean(axis=0)

    vector = SteeringVector.from_diff(
        torch.from_numpy(h_base), torch.from_numpy(h_tuned), layers=(3, 5), dataset="toy"
    )

    assert vector.vectors.dtype == torch.float32
    np.testing.assert_allclose(vector.vectors.numpy(), reference, rtol=2e-7, atol=0)
    assert vector.layers == (3, 5)
    assert vector.n_samples == 10_000
    assert vector.kind == "mean_diff"
    assert vector.dataset == "toy"
    assert vector.mahals_version == __version__


def test_from_diff_default_layers_and_shape_errors():
    h = torch.zeros(4, 3, 5)
    assert SteeringVector.from_diff(h, h + 1).layers == (0, 1, 2)
    with pytest.raises((ValueError, TypeError)):
        SteeringVector.from_diff(h, h[:, :2])


# ----------------------------------------------------------------------------------- arithmetic


def test_arithmetic_norms_and_cosine_match_numpy():
    a = _random_vector(seed=1, dataset="hh", base_model="base", tuned_model="it", kind="mean_diff")
    b = _random_vector(seed=2, dataset="hh", base_model="base", tuned_model="other", kind="svd3")
    va, vb = a.vectors.double().numpy(), b.vectors.double().numpy()

    np.testing.assert_allclose((a + b).vectors.numpy(), va + vb, rtol=1e-6)
    np.testing.assert_allclose((a - b).vectors.numpy(), va - vb, rtol=1e-6)
    np.testing.assert_allclose((2.5 * a).vectors.numpy(), 2.5 * va, rtol=1e-6)
    np.testing.assert_allclose((a * -3).vectors.numpy(), -3 * va, rtol=1e-6)
    np.testing.assert_allclose((-a).vectors.numpy(), -va, rtol=0)

    np.testing.assert_allclose(a.norms().numpy(), np.linalg.norm(va, axis=1), rtol=1e-6)
    expected_cosine = (va * vb).sum(1) / (np.linalg.norm(va, axis=1) * np.linalg.norm(vb, axis=1))
    np.testing.assert_allclose(a.cosine(b).numpy(), expected_cosine, rtol=1e-5)
    np.testing.assert_allclose(a.cosine(-a).numpy(), -1.0, rtol=1e-6)

    combined = a - b
    assert combined.kind == "mean_diff - svd3"
    assert (combined.dataset, combined.base_model, combined.tuned_model) == ("hh", "base", None)
    assert (2 * (a + b)).kind == "2*(mean_diff + svd3)"


def test_arithmetic_refuses_mismatches():
    a = _random_vector(layers=(0, 1, 2))
    with pytest.raises(ValueError, match="different layers"):
        a + _random_vector(layers=(1, 2, 3))
    with pytest.raises(ValueError, match="shapes"):
        a - _random_vector(layers=(0, 1, 2), d_model=7)
    with pytest.raises(TypeError):
        a * a
    with pytest.raises(TypeError):
        a + 1.0


def test_normalized_has_unit_rows_and_keeps_zero_rows():
    vector = _random_vector(layers=(0, 1, 2, 3), d_model=5)
    vectors = vector.vectors.clone()
    vectors[2] = 0.0
    vector = SteeringVector(vectors=vectors, layers=vector.layers)

    unit = vector.normalized()

    np.testing.assert_allclose(unit.norms().numpy(), [1.0, 1.0, 0.0, 1.0], rtol=1e-6)
    assert torch.all(unit.vectors[2] == 0)
    expected = vectors[[0, 1, 3]].double().numpy()
    np.testing.assert_allclose(unit.vectors[[0, 1, 3]].numpy(), _unit(expected), rtol=1e-6)


def test_layer_indexes_by_model_layer_and_to_keeps_metadata():
    vector = _random_vector(layers=(4, 9, 17), dataset="hh")
    assert torch.equal(vector.layer(9), vector.vectors[1])
    with pytest.raises(IndexError, match="model layer 0"):
        vector.layer(0)

    half = vector.to(dtype=torch.float16)
    assert half.vectors.dtype == torch.float16
    assert (half.layers, half.dataset, half.created) == (vector.layers, "hh", vector.created)


def test_constructor_validates_layers():
    with pytest.raises(ValueError, match="layer indices"):
        SteeringVector(vectors=torch.zeros(3, 4), layers=(0, 1))
    with pytest.raises(ValueError, match="distinct"):
        SteeringVector(vectors=torch.zeros(2, 4), layers=(1, 1))


# ---------------------------------------------------------------------------------------- files


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_round_trip_is_bit_exact(tmp_path, dtype):
    vectors = torch.randn(3, 8, generator=torch.Generator().manual_seed(3)).to(dtype)
    vectors[0, 0] = -0.0  # equal to +0.0 under ==, so only a bitwise comparison sees it
    vectors[1, 1] = torch.finfo(dtype).tiny / 2  # a subnormal (NaN is refused: issue 8)
    original = SteeringVector(
        vectors=vectors,
        layers=(2, 5, 7),
        base_model="meta-llama/Llama-3.1-8B",
        tuned_model="meta-llama/Llama-3.1-8B-Instruct",
        dataset="Anthropic/hh-rlhf:chosen",
        n_samples=100,
        pool="last",
        kind="svd3",
        description="test",
        extra={"seed": 1, "nested": {"a": [1, 2]}},
    )

    written = original.save(tmp_path / "vector.safetensors")
    loaded = SteeringVector.load(written)

    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert loaded.vectors.dtype == dtype
    assert torch.equal(loaded.vectors.view(bits), original.vectors.view(bits))
    assert loaded.metadata() == original.metadata()
    sidecar = json.loads((tmp_path / "vector.json").read_text())
    assert sidecar["shape"] == [3, 8]
    assert sidecar["layers"] == [2, 5, 7]


def test_load_without_sidecar_names_the_file(tmp_path):
    path = _random_vector().save(tmp_path / "lonely.safetensors")
    (tmp_path / "lonely.json").unlink()
    with pytest.raises(FileNotFoundError, match="lonely.json"):
        SteeringVector.load(path)


def test_load_with_mismatched_shape_names_the_file(tmp_path):
    path = _random_vector(layers=(0, 1, 2), d_model=6).save(tmp_path / "v.safetensors")
    _random_vector(layers=(0, 1), d_model=6).save(tmp_path / "other.safetensors")
    (tmp_path / "other.safetensors").replace(path)  # tensor file no longer matches its sidecar
    with pytest.raises(ValueError, match=r"v\.safetensors.*does not match"):
        SteeringVector.load(path)


def test_gguf_export_reads_back(tmp_path):
    vector = _random_vector(layers=(0, 1, 2, 3), d_model=10)

    with pytest.warns(UserWarning, match="layer 0"):
        path = vector.to_gguf(tmp_path / "vector.gguf", model_hint="llama")

    reader = gguf.GGUFReader(path)
    assert reader.get_field("general.architecture").contents() == "controlvector"
    assert reader.get_field("controlvector.model_hint").contents() == "llama"
    assert reader.get_field("controlvector.layer_count").contents() == 3
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    assert sorted(tensors) == ["direction.1", "direction.2", "direction.3"]
    for layer in (1, 2, 3):
        tensor = tensors[f"direction.{layer}"]
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
        np.testing.assert_array_equal(tensor.data, vector.layer(layer).numpy())


def test_gguf_export_keeps_model_layer_indices_without_warning(tmp_path):
    vector = _random_vector(layers=(5, 7), d_model=4).to(dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = vector.to_gguf(tmp_path / "sparse.gguf", model_hint="gemma2")
    tensors = {tensor.name: tensor.data for tensor in gguf.GGUFReader(path).tensors}
    assert sorted(tensors) == ["direction.5", "direction.7"]
    np.testing.assert_array_equal(tensors["direction.7"], vector.layer(7).float().numpy())


# ------------------------------------------------------------------------------------------ SVD


def _planted(n=200, d=32, layers=3, sign=1.0, seed=0):
    """Differences ``a_i · u_l + noise`` with ``a_i ~ N(2, 3²)``: ``u_l`` dominates both the
    mean and the variance. Returns (h_base, h_tuned, planted directions [layer, d])."""
    rng = np.random.default_rng(seed)
    planted = sign * _unit(rng.normal(size=(layers, d)))
    coefficients = rng.normal(2.0, 3.0, size=(n, layers, 1))
    differences = coefficients * planted[None] + 0.1 * rng.normal(size=(n, layers, d))
    h_base = rng.normal(size=(n, layers, d))
    return torch.from_numpy(h_base), torch.from_numpy(h_base + differences), planted


@pytest.mark.parametrize("centered", [False, True])
def test_component_zero_recovers_planted_direction_with_its_sign(centered):
    for sign in (1.0, -1.0):  # negating the basis must negate the component
        h_base, h_tuned, planted = _planted(sign=sign)
        svd = difference_svd(h_base, h_tuned, centered=centered)
        mean = SteeringVector.from_diff(h_base, h_tuned)

        cosine = (svd.components[:, 0].numpy() * planted).sum(-1)
        assert np.all(cosine > 0.99), cosine

        component = svd.component(0, mean)
        assert component.kind == "svd0"
        np.testing.assert_allclose(component.norms().numpy(), mean.norms().numpy(), rtol=1e-5)
        assert torch.all(component.cosine(mean) > 0.9)


def test_component_flips_sign_towards_the_mean_it_is_given():
    h_base, h_tuned, _ = _planted()
    svd = difference_svd(h_base, h_tuned, centered=True)
    mean = SteeringVector.from_diff(h_base, h_tuned)
    assert torch.equal(svd.component(2, -mean).vectors, -svd.component(2, mean).vectors)
    dots = torch.einsum("lkd,ld->lk", svd.components, mean.vectors.to(svd.components.dtype))
    assert torch.all(dots >= 0)
    with pytest.raises(IndexError):
        svd.component(svd.components.shape[1], mean)


@pytest.mark.parametrize("method", ["full", "gram"])
@pytest.mark.parametrize("centered", [False, True])
def test_explained_variance_sums_to_one_and_matches_numpy(method, centered):
    h_base, h_tuned, _ = _planted(n=40, d=12)
    svd = difference_svd(h_base, h_tuned, centered=centered, method=method)

    differences = (h_tuned - h_base).numpy().transpose(1, 0, 2)
    if centered:
        differences = differences - differences.mean(axis=1, keepdims=True)
    singular_values = np.linalg.svd(differences, compute_uv=False)
    expected = singular_values**2 / (singular_values**2).sum(-1, keepdims=True)
    np.testing.assert_allclose(svd.explained_variance_ratio.sum(-1).numpy(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(svd.explained_variance_ratio.numpy(), expected, rtol=1e-4, atol=1e-7)

    truncated = difference_svd(h_base, h_tuned, centered=centered, method=method, n_components=2)
    np.testing.assert_allclose(
        truncated.explained_variance_ratio.numpy(), expected[:, :2], rtol=1e-4
    )


@pytest.mark.parametrize(("n", "d"), [(30, 50), (50, 30)])
@pytest.mark.parametrize("method", ["full", "gram"])
def test_singular_values_match_numpy_in_float64(n, d, method):
    rng = np.random.default_rng(7)
    h_base = rng.normal(size=(n, 4, d))
    h_tuned = rng.normal(size=(n, 4, d)) + rng.normal(size=(1, 4, d))
    svd = difference_svd(
        torch.from_numpy(h_base),
        torch.from_numpy(h_tuned),
        centered=False,
        method=method,
        compute_dtype=torch.float64,
    )
    expected = np.linalg.svd((h_tuned - h_base).transpose(1, 0, 2), compute_uv=False)
    assert svd.singular_values.dtype == torch.float64
    np.testing.assert_allclose(svd.singular_values.numpy(), expected, rtol=1e-10)


def test_centered_versus_uncentered_when_the_mean_dominates():
    # D = m + 3·b_i·w + small noise, with m ⟂ w and ‖m‖ = 10: the uncentered top direction is
    # the mean m; centring removes m and leaves w on top.
    rng = np.random.default_rng(1)
    n, d = 64, 48
    m, w = np.linalg.qr(rng.normal(size=(d, 2)))[0].T
    differences = 10 * m + 3 * rng.normal(size=(n, 1)) * w + 0.05 * rng.normal(size=(n, d))
    h_base = torch.zeros(n, 1, d, dtype=torch.float64)
    h_tuned = torch.from_numpy(differences)[:, None, :]
    mean = SteeringVector.from_diff(h_base, h_tuned)

    uncentered = difference_svd(h_base, h_tuned, centered=False, compute_dtype=torch.float64)
    centered = difference_svd(h_base, h_tuned, centered=True, compute_dtype=torch.float64)

    assert float(uncentered.components[0, 0] @ torch.from_numpy(m)) > 0.99
    stats = uncentered.dsteer_stats(mean)
    assert stats.top_direction_alignment.item() > 0.99
    assert stats.singular_value_ratio.item() < 0.4
    assert abs(float(centered.components[0, 0] @ torch.from_numpy(m))) < 0.05
    assert abs(float(centered.components[0, 0] @ torch.from_numpy(w))) > 0.99
    with pytest.raises(ValueError, match="uncentered"):
        centered.dsteer_stats(mean)


def test_centered_rank_deficiency_gives_zero_components():
    # n <= d: a centered D has rank n - 1, so its last direction is undefined.
    h_base, h_tuned, _ = _planted(n=10, d=20, layers=2)
    for method in ("full", "gram"):
        svd = difference_svd(h_base, h_tuned, centered=True, method=method)
        assert torch.all(svd.singular_values[:, -1] == 0)
        assert torch.all(svd.components[:, -1] == 0)
        norms = torch.linalg.vector_norm(svd.components[:, :-1], dim=-1)
        torch.testing.assert_close(norms, torch.ones_like(norms))


@pytest.mark.parametrize(("n", "d"), [(60, 200), (200, 60)])
def test_gram_and_lowrank_paths_match_full(n, d):
    rng = np.random.default_rng(3)
    spectrum = np.array([20.0, 10.0, 5.0, 2.5])  # well-separated top directions
    left = np.linalg.qr(rng.normal(size=(n, 4)))[0]
    right = np.linalg.qr(rng.normal(size=(d, 4)))[0]
    differences = np.stack([(left * spectrum) @ right.T for _ in range(2)], axis=1)
    differences += 0.01 * rng.normal(size=differences.shape)
    h_base = torch.zeros(n, 2, d)
    h_tuned = torch.from_numpy(differences).float()

    full = difference_svd(h_base, h_tuned, centered=False, method="full", n_components=4)
    gram = difference_svd(h_base, h_tuned, centered=False, method="gram", n_components=4)
    lowrank = difference_svd(h_base, h_tuned, centered=False, method="lowrank", n_components=4)

    assert (full.method, gram.method, lowrank.method) == ("full", "gram", "lowrank")
    for other, tolerance in ((gram, 1e-4), (lowrank, 1e-3)):
        torch.testing.assert_close(
            other.singular_values, full.singular_values, rtol=tolerance, atol=0
        )
        # Same sign convention on every path, so the components agree entry by entry.
        torch.testing.assert_close(other.components, full.components, rtol=0, atol=10 * tolerance)


def test_auto_method_choice():
    small = torch.zeros(20, 1, 600)
    assert difference_svd(small, small + 1, centered=False).method == "gram"
    precise = difference_svd(small, small + 1, centered=False, compute_dtype=torch.float64)
    assert precise.method == "full"
    large = torch.zeros(600, 1, 520, dtype=torch.float64)
    assert difference_svd(large, large + 1, centered=False).method == "gram"


def test_result_is_typed():
    h_base, h_tuned, _ = _planted(n=12, d=8, layers=2)
    svd = difference_svd(h_base, h_tuned, centered=True, layers=(10, 20))
    assert isinstance(svd, DifferenceSVD)
    assert svd.layers == (10, 20)
    assert svd.n_samples == 12
    assert svd.components.shape == (2, 8, 8)
    with pytest.raises(ValueError, match="layers"):
        svd.component(0, SteeringVector.from_diff(h_base, h_tuned))


def test_jaxtyping_shape_checks_reject_wrong_shapes():
    with pytest.raises(jaxtyping.TypeCheckError):
        difference_svd(torch.zeros(4, 5), torch.zeros(4, 5), centered=False)
    with pytest.raises(jaxtyping.TypeCheckError):
        SteeringVector.from_diff(torch.zeros(4, 2, 5), torch.zeros(4, 2, 6))
    with pytest.raises(jaxtyping.TypeCheckError):
        SteeringVector(vectors=torch.zeros(2, 3, dtype=torch.int64), layers=(0, 1))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["full", "gram", "lowrank"])
def test_svd_on_cuda_matches_cpu(method):
    h_base, h_tuned, _ = _planted(n=300, d=96)
    cpu = difference_svd(h_base, h_tuned, centered=True, method=method, n_components=3)
    gpu = difference_svd(
        h_base.cuda(), h_tuned.cuda(), centered=True, method=method, n_components=3
    )
    assert gpu.components.device.type == "cuda"
    # lowrank sketches with each device's own random numbers: beyond the planted direction the
    # spectrum is flat noise, whose values a sketch gets to about 1 % (1.4 % at most over five
    # CPU seeds against the exact SVD) and whose directions it cannot pin down
    exact = 1 if method == "lowrank" else 3
    torch.testing.assert_close(
        gpu.singular_values[:, :exact].cpu(), cpu.singular_values[:, :exact], rtol=1e-3, atol=0
    )
    torch.testing.assert_close(
        gpu.components[:, :exact].cpu(), cpu.components[:, :exact], rtol=0, atol=1e-2
    )
    if method == "lowrank":
        full = difference_svd(h_base, h_tuned, centered=True, method="full", n_components=3)
        for result in (cpu, gpu):
            torch.testing.assert_close(
                result.singular_values.cpu(), full.singular_values, rtol=3e-2, atol=0
            )
    mean = SteeringVector.from_diff(h_base.cuda(), h_tuned.cuda())
    assert mean.vectors.device.type == "cuda"
    assert gpu.component(0, mean).vectors.device.type == "cuda"


def test_version_1_sidecar_with_token_position_still_loads(tmp_path):
    path = _random_vector(pool="mean").save(tmp_path / "old.safetensors")
    sidecar = tmp_path / "old.json"
    meta = json.loads(sidecar.read_text())
    meta["token_position"] = meta.pop("pool")
    meta["format_version"] = 1
    sidecar.write_text(json.dumps(meta))
    assert SteeringVector.load(path).pool == "mean"
    meta["format_version"] = 99
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"old\.json: format_version 99"):
        SteeringVector.load(path)


# ----------------------------------------------------------------------------------- extraction


def test_extract_pair_vectors_matches_a_numpy_float64_reference():
    rng = np.random.default_rng(5)
    n, n_layers, d = 12, 3, 7
    base = {a: rng.normal(size=(n, n_layers, d)).astype(np.float32) for a in ("chosen", "rejected")}
    tuned = {
        a: (base[a] + rng.normal(0.5, 1.0, size=base[a].shape)).astype(np.float32) for a in base
    }
    pair = extract_pair_vectors(
        {a: torch.from_numpy(v) for a, v in base.items()},
        {a: torch.from_numpy(v) for a, v in tuned.items()},
        svd_component=2,
        n_explained=4,
        dataset="toy",
        meaning="a test",
        pool="last",
    )
    for answer, vector in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        b, t = base[answer].astype(np.float64), tuned[answer].astype(np.float64)
        np.testing.assert_allclose(vector.vectors.numpy(), (t - b).mean(0), rtol=1e-5, atol=1e-6)
        assert vector.dataset == f"toy:{answer}" and vector.pool == "last"
        cosines = (t * b).sum(-1) / (np.linalg.norm(t, axis=-1) * np.linalg.norm(b, axis=-1))
        np.testing.assert_allclose(pair.cosines[answer].numpy(), cosines.mean(0), rtol=1e-12)
        np.testing.assert_allclose(
            mean_cosine_per_layer(torch.from_numpy(tuned[answer]), torch.from_numpy(base[answer])),
            cosines.mean(0),
            rtol=1e-12,
        )  # symmetric in its arguments
    differences = (tuned["chosen"].astype(np.float64) - base["chosen"]).transpose(1, 0, 2)
    centered = differences - differences.mean(1, keepdims=True)
    for layer in range(n_layers):
        _, _, right = np.linalg.svd(centered[layer], full_matrices=False)
        got = pair.svd.vectors[layer].double().numpy()
        assert abs(np.dot(_unit(got), right[2])) > 0.9999
    assert pair.centered.singular_values.shape == (n_layers, 4)
    assert pair.svd_null_layers == []
    assert pair.frobenius_norm == pytest.approx(np.linalg.norm(differences.mean(1)), rel=1e-6)


def test_extract_pair_vectors_refuses_blocks_of_different_shapes():
    blocks = {a: torch.zeros(4, 2, 3) for a in ("chosen", "rejected")}
    other = {"chosen": torch.zeros(4, 2, 3), "rejected": torch.zeros(5, 2, 3)}
    with pytest.raises(ValueError, match="differ in shape"):
        extract_pair_vectors(
            blocks, other, svd_component=0, n_explained=1, dataset="d", meaning="m"
        )
