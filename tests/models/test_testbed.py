"""The trained testbed: loading (checksum, corrupt files refused), training (a step learns, a resumed run is the
uninterrupted run), the image measures on identical inputs, and the bench's image fields on ``testbed-1024``."""

import json
import math
import shutil

import pytest
import torch

from sdtm_compile.bench import BenchConfig, BenchReport, run_benchmark
from sdtm_compile.engines.cache import sha256_file
from sdtm_compile.methods.sdtm.config import SDTMConfig
from sdtm_compile.models import MODEL_PRESETS, build_model
from sdtm_compile.models.testbed.data import LABEL_SLOTS, SOURCES, sample_batch
from sdtm_compile.models.testbed.model import (
    MANIFEST_FILE,
    TESTBEDS,
    WEIGHTS_FILE,
    load_testbed,
    new_testbed,
    save_testbed,
    weights_file,
)
from sdtm_compile.models.testbed.model import TestbedWeightsError as WeightsError
from sdtm_compile.models.testbed.quality import generation_inputs, image_psnr, image_ssim, merged_losses
from sdtm_compile.models.testbed.train import TrainConfig, flow_matching_loss, make_eval_set, train_step, train_testbed

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.unit
@pytest.mark.parametrize(("name", "dtype"), [("testbed-1024", "float16"), ("testbed12-1024", "int8 rows")])
def test_the_preset_loads_the_shipped_weights(name, dtype):
    spec = TESTBEDS[name]
    transformer = build_model(MODEL_PRESETS[name].spec)
    assert type(transformer).__name__ == "SD3Transformer2DModel"
    assert not transformer.training
    config = transformer.config
    assert (config.in_channels, config.patch_size, config.num_layers) == (3, 2, spec.num_layers)
    assert config.num_attention_heads * config.attention_head_dim == spec.inner_dim == 192
    out = transformer(
        **{
            "hidden_states": torch.zeros(1, 3, 64, 64),
            "encoder_hidden_states": torch.zeros(1, 6, 64),
            "pooled_projections": torch.zeros(1, 64),
            "timestep": torch.tensor([500.0]),
        }
    ).sample
    assert out.shape == (1, 3, 64, 64)
    assert torch.isfinite(out).all()
    weights = weights_file(name)
    manifest = json.loads(weights.with_suffix(".json").read_text())
    assert manifest["sha256"] == sha256_file(weights)
    assert weights.stat().st_size <= 25 * 2**20
    assert manifest["dtype"].startswith(dtype)
    assert manifest["training"]["steps"] > 0
    # it learned: held-out loss well below the same architecture with random weights
    assert manifest["training"]["final_heldout_loss"] < 0.8 * manifest["training"]["random_init_heldout_loss"]
    assert {image["name"] for image in manifest["images"]} == {s.name for s in SOURCES}


@pytest.mark.unit
def test_missing_or_corrupt_weights_are_refused_by_name(tmp_path):
    weights, manifest = tmp_path / "w.safetensors", tmp_path / "manifest.json"
    with pytest.raises(WeightsError, match=f"{weights}.* is missing"):
        load_testbed(weights, MANIFEST_FILE)
    shutil.copy(WEIGHTS_FILE, weights)
    shutil.copy(MANIFEST_FILE, manifest)
    assert isinstance(load_testbed(weights, manifest), torch.nn.Module)
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte in a tensor
    weights.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=f"{weights} are corrupt or replaced"):
        load_testbed(weights, manifest)
    manifest.write_text("{not json")
    with pytest.raises(WeightsError, match=f"manifest {manifest} is not valid"):
        load_testbed(weights, manifest)


@pytest.mark.unit
def test_the_deep_testbed_is_stored_as_int8_rows_under_25_mb(tmp_path):
    """12 blocks at the testbed's width would be 31 MB in float16: 2-D weights go as int8 rows (a float32 scale per
    row), and what loads back is that model, close to the trained one."""
    config = TrainConfig.deep()
    assert (config.model, config.storage, config.steps_low + config.steps_full) == ("testbed12-1024", "int8", 2400)
    assert MODEL_PRESETS["testbed12-1024"].spec == TESTBEDS["testbed12-1024"]
    assert TESTBEDS["testbed12-1024"].num_layers == 12
    model = new_testbed(spec=TESTBEDS["testbed12-1024"]).eval()
    path = tmp_path / "testbed12-1024.safetensors"
    manifest = save_testbed(model, path, {"training": {}}, "testbed12-1024", "int8")
    assert manifest["model"] == "testbed12-1024" and manifest["dtype"].startswith("int8 rows")
    assert path.stat().st_size <= 25 * 2**20
    loaded = load_testbed(path, name="testbed12-1024")
    x, labels, sigma = torch.randn(1, 3, 64, 64), torch.zeros(1, 6, dtype=torch.long), torch.tensor([0.5])
    with torch.no_grad():
        want, got = model(x, labels, sigma), loaded(x, labels, sigma)
    assert (got - want).abs().max() < 0.02 * want.abs().max()
    with pytest.raises(WeightsError, match="do not fit the testbed model testbed-1024"):
        load_testbed(path, name="testbed-1024")  # a 12-block file is not the 4-block model
    with pytest.raises(ValueError, match="unknown testbed 'testbed7'"):
        TrainConfig(model="testbed7")


@pytest.mark.unit
def test_images_and_labels():
    g = torch.Generator().manual_seed(0)
    x, labels = sample_batch("heldout", 4, g)
    assert x.shape == (4, 3, 64, 64)
    assert -1 <= x.min()
    assert x.max() <= 1
    assert labels.shape == (4, len(LABEL_SLOTS))
    assert (labels[:, 0] == 0).all()  # held out: source unknown
    sizes = torch.tensor([len(words) + 1 for words in LABEL_SLOTS.values()])
    assert ((labels >= 0) & (labels < sizes)).all()
    assert {s.split for s in SOURCES} == {"train", "heldout"}
    assert all(s.licence for s in SOURCES)


@pytest.mark.slow
def test_one_training_step_decreases_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = new_testbed()
    g = torch.Generator().manual_seed(1)
    x0, labels = sample_batch("train", 4, g)
    x0 = torch.nn.functional.avg_pool2d(x0, 2)  # 32x32: a cheap step
    batch = (x0, labels, torch.randn(x0.shape, generator=g), torch.full((4,), 0.5))
    optimizer = torch.optim.AdamW(model.parameters())
    before = train_step(model, optimizer, batch, lr=1e-3)
    with torch.no_grad():
        after = flow_matching_loss(model, *batch).item()
    assert after < before


@pytest.mark.slow
def test_a_resumed_run_is_the_uninterrupted_run(tmp_path):
    """Batches come from (seed, step): stopping after 1 step and resuming gives the same weights, bit for bit."""
    small = {"steps_low": 1, "steps_full": 1, "batch_low": 2, "batch_full": 1, "checkpoint_every": 2,
             "eval_every": 2, "eval_crops": 1, "warmup": 1}  # fmt: skip
    whole = TrainConfig(out_dir=str(tmp_path / "a"), weights=str(tmp_path / "a" / "w.safetensors"), **small)
    sliced = TrainConfig(out_dir=str(tmp_path / "b"), weights=str(tmp_path / "b" / "w.safetensors"), **small)
    expected = train_testbed(whole, progress=False)
    assert train_testbed(sliced, progress=False, max_steps=1) is None  # interrupted after the 32x32 step
    resumed = train_testbed(sliced, progress=False)
    assert resumed["sha256"] == expected["sha256"]
    assert resumed["training"]["steps"] == 2
    log = [json.loads(line) for line in (tmp_path / "b" / "loss.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1, 2]
    assert [e["side"] for e in log] == [32, 64]
    assert "heldout_eval" in log[-1]
    assert (tmp_path / "b" / "loss.png").read_bytes()[:8] == PNG
    with pytest.raises(RuntimeError, match="written by another TrainConfig"):
        train_testbed(TrainConfig(**{**sliced.__dict__, "lr": 1e-3}), progress=False)


@pytest.mark.unit
def test_quality_measures_on_identical_inputs():
    testbed = load_testbed()
    image = generation_inputs(testbed, seed=0).latents.clamp(-1, 1)
    assert image_psnr(image, image) == math.inf
    assert image_ssim(image, image) == 1.0
    noisy = image + 0.1 * torch.randn_like(image)
    assert 10 < image_psnr(noisy, image) < 40
    assert image_ssim(noisy, image) < 1.0
    evalset = make_eval_set("heldout", 2)
    unmerged = merged_losses(testbed, SDTMConfig(ratio=0.0, deviation=0.0), (0.3, 0.9), evalset)
    assert [row.increase for row in unmerged] == [0.0, 0.0]  # ratio 0 is the unmodified model
    merged = merged_losses(testbed, SDTMConfig(ratio=0.5), (0.3, 0.9), evalset)
    assert [row.engine.split("@")[0] for row in merged] == ["detail", "structure"]
    assert all(row.increase != 0.0 for row in merged)


@pytest.mark.slow
def test_bench_reports_image_measures_on_the_testbed(tmp_path):
    config = BenchConfig(
        model="testbed-1024", latent=16, steps=3, runs=1, warmup=0, sweep=(), engine="eager", cold_caches=False,
        quality_seeds=2, quality_sigmas=(0.5,), out_dir=str(tmp_path),
    )  # fmt: skip
    result = run_benchmark(config)
    saved = json.loads((tmp_path / "result.json").read_text())
    assert BenchReport.from_dict(saved).to_json() == result.to_json()
    quality = saved["quality"]
    assert [row["seed"] for row in quality["seeds"]] == [0, 1]
    for row in quality["seeds"]:
        assert 0 < row["ssim"] <= 1
        assert row["psnr_db"] > 10
    assert quality["ssim_min"] == min(row["ssim"] for row in quality["seeds"])
    assert [row["sigma"] for row in quality["losses"]] == [0.5]
    assert set(quality["losses"][0]) == {"sigma", "unmerged", "merged", "increase", "engine"}
    assert len(quality["image"]) == 16  # the 16x16 image of this run
    assert len(quality["image"][0][0]) == 3
    points = {point["name"]: point for point in saved["points"]}
    assert points["sdtm"]["ssim"] == quality["seeds"][0]["ssim"]
    assert points["sdtm"]["image_psnr_db"] == quality["seeds"][0]["psnr_db"]
    assert points["eager"]["ssim"] == 1.0
    assert (tmp_path / "merge_maps.png").read_bytes()[:8] == PNG
    assert "Held-out flow-matching loss" in (tmp_path / "index.md").read_text()
