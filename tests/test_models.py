"""Tests for medsr.models: registry, shapes, parameter counts, training step, curriculum."""

from __future__ import annotations

import importlib
import inspect
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from medsr.models import (ARCHITECTURES, ModelSpec, build_discriminator, build_generator, count_parameters,
                          curriculum_stage, model_names, model_spec, register_architecture)
from medsr.models.architectures import ArchitectureRegistry
from medsr.models.blocks import SRGenerator
from medsr.ops import bicubic_upsample
from medsr.scale import SUPPORTED_SCALES

LR_H, LR_W = 13, 17  # odd on purpose: pixel shuffle and strided convs must not assume even sizes
BATCH = 2
MODEL_NAMES = model_names()
ADVERSARIAL = [n for n in MODEL_NAMES if model_spec(n).adversarial]
TRAINABLE = list(model_names(trained=True))
# Models whose train and eval forward differ only by the eval clamp (no BatchNorm, no dropout).
NO_BATCHNORM = ["espcn", "brainsr", "blimsr", "residual_cnn", "bicubic"]
MODELS_DIR = Path(importlib.import_module("medsr.models").__file__).parent


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def lr_batch(h: int = LR_H, w: int = LR_W) -> torch.Tensor:
    return torch.rand(BATCH, 1, h, w)


def model_module(name: str):
    return importlib.import_module(model_spec(name).generator.__module__)


def sample_options(name: str, discriminator: bool = False) -> dict[str, int]:
    """The small variant of a model where it has one (BliMSR), for the slow gradient tests."""
    return dict(getattr(model_module(name), "DISCRIMINATOR_SAMPLE_OPTIONS" if discriminator else "SAMPLE_OPTIONS", {}))


def documented_counts(name: str) -> dict[str, int]:
    """The ``    <what> = 1,234`` lines of a model module's docstring."""
    doc = inspect.getdoc(model_module(name)) or ""
    pattern = r"(?m)^\s*(generator x\d+(?: sample)?|discriminator(?: sample)?) = ([\d,]+)\s*$"
    return {key: int(value.replace(",", "")) for key, value in re.findall(pattern, doc)}


# --------------------------------------------------------------------------- registry


def test_registry_lists_the_ten_models() -> None:
    assert MODEL_NAMES == ("bicubic", "blimsr", "brainsr", "espcn", "residual_cnn", "rfdn", "rlfn", "span", "srgan",
                           "swift_srgan")
    assert TRAINABLE == [n for n in MODEL_NAMES if n != "bicubic"]


def test_every_model_is_registered_by_its_own_file() -> None:
    # The registry is filled by the decorators alone: the package imports every module in it.
    for name in MODEL_NAMES:
        assert model_module(name).__name__ == f"medsr.models.{name}", name
    assert model_spec("srgan").generator.__name__ == "SRResNet"
    assert model_spec("brainsr").curriculum is curriculum_stage


class _Toy(SRGenerator):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(bicubic_upsample(x, self.scale))


def test_registry_refuses_a_taken_name_and_names_itself() -> None:
    registry = ArchitectureRegistry("test")
    register = lambda name: registry.add(ModelSpec(  # noqa: E731
        name, _Toy, None, False, "standard", (2, 4), "", "a toy", "pixel"))
    register("toy")
    with pytest.raises(ValueError, match=r"test registry: 'toy' is already registered by .*_Toy"):
        register("toy")
    with pytest.raises(ValueError, match=r"unknown model 'other' in the test registry; valid names: toy"):
        registry.get("other")
    # The shared registry refuses an existing model's name from a new decorator, and is unchanged after.
    with pytest.raises(ValueError, match=r"architecture registry: 'espcn' is already registered by .*ESPCN"):
        register_architecture("espcn", description="a second espcn")(_Toy)
    assert model_spec("espcn").generator.__name__ == "ESPCN"


@pytest.mark.parametrize(("field", "value", "message"), [
    ("name", "Toy-2", "lower-case Python identifier"), ("training_pairs", "paired", "training_pairs must be one of"),
    ("scales", (3,), "supported scales: 2, 4"), ("description", " ", "a description is required"),
    ("conditional_discriminator", True, "needs a discriminator"),
])
def test_model_spec_refuses_invalid_fields(field: str, value: object, message: str) -> None:
    fields = dict(name="toy", generator=_Toy, discriminator=None, conditional_discriminator=False,
                  training_pairs="standard", scales=(2, 4), seed="", description="a toy", loss_recipe="pixel")
    with pytest.raises(ValueError, match=message):
        ModelSpec(**{**fields, field: value})


def test_a_model_registered_through_the_api_is_listed_and_built() -> None:
    register_architecture("toy_api", description="bicubic under another name")(_Toy)
    try:
        assert "toy_api" in model_names(trained=True) and "toy_api" not in MODEL_NAMES  # a snapshot from before
        assert build_generator("toy_api", 2)(torch.rand(1, 1, 5, 5)).shape == (1, 1, 10, 10)
        assert build_discriminator("toy_api") is None
    finally:
        ARCHITECTURES.remove("toy_api")
    assert "toy_api" not in model_names()


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_model_spec_fields(name: str) -> None:
    spec = model_spec(name)
    assert isinstance(spec, ModelSpec)
    assert spec.name == name
    assert spec.scales == (2, 4) == SUPPORTED_SCALES
    assert spec.training_pairs in ("standard", "blind", "ssl")
    assert spec.description
    assert spec.conditional_discriminator <= spec.adversarial
    assert (build_discriminator(name) is None) == (not spec.adversarial)
    if spec.seed:  # the model file cites the seed it was absorbed from
        assert spec.seed.endswith(".md")
        assert spec.seed in (inspect.getdoc(model_module(name)) or "")


def test_model_specs_match_the_seeds() -> None:
    assert model_spec("brainsr").conditional_discriminator
    assert not any(model_spec(n).conditional_discriminator for n in MODEL_NAMES if n != "brainsr")
    assert model_spec("blimsr").training_pairs == "blind"
    assert model_spec("residual_cnn").training_pairs == "ssl"
    assert set(ADVERSARIAL) == {"srgan", "swift_srgan", "brainsr", "blimsr"}


def test_unknown_name_lists_valid_names() -> None:
    for call in (lambda: build_generator("edsr", 4), lambda: build_discriminator("edsr"), lambda: model_spec("edsr")):
        with pytest.raises(ValueError) as err:
            call()
        assert "edsr" in str(err.value)
        assert all(name in str(err.value) for name in MODEL_NAMES)


@pytest.mark.parametrize("scale", [3, 8, 1, 0, 2.0, True, "4"])
def test_unsupported_scale_names_supported_scales(scale: object) -> None:
    with pytest.raises(ValueError, match=r"supported scales: 2, 4"):
        build_generator("espcn", scale)  # type: ignore[arg-type]


def test_unknown_option_is_rejected() -> None:
    with pytest.raises(TypeError):
        build_generator("espcn", 4, n_groups=3)


def test_no_torchvision_and_no_hard_coded_device() -> None:
    for path in MODELS_DIR.glob("*.py"):
        source = path.read_text()
        assert "torchvision" not in source, path.name
        assert not re.search(r"\.(cuda|cpu)\(|device\s*=\s*['\"]", source), path.name


# --------------------------------------------------------------------------- generators


@pytest.mark.parametrize("scale", SUPPORTED_SCALES)
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_generator_shape_train_and_eval(name: str, scale: int) -> None:
    g = build_generator(name, scale)
    assert g.scale == scale
    x = lr_batch()
    y = g.train()(x).detach()
    assert y.shape == (BATCH, 1, LR_H * scale, LR_W * scale)
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    # Near [0, 1] untrained: bicubic plus a small residual, not an arbitrary activation.
    assert -0.5 < float(y.min()) and float(y.max()) < 1.5
    g.eval()
    with torch.no_grad():
        z = g(x)
    assert z.shape == y.shape and not z.requires_grad
    assert float(z.min()) >= 0.0 and float(z.max()) <= 1.0


@pytest.mark.parametrize("name", NO_BATCHNORM)
def test_training_mode_does_not_clamp(name: str) -> None:
    # Bicubic rings by ~10% on both sides of a hard 0 -> 1 edge.
    x = (torch.arange(LR_W) >= LR_W // 2).float().expand(BATCH, 1, LR_H, LR_W)
    g = build_generator(name, 2, **sample_options(name))
    with torch.no_grad():
        raw = g.train()(x)
        clamped = g.eval()(x)
    assert float(raw.min()) < 0.0 and float(raw.max()) > 1.0
    torch.testing.assert_close(clamped, raw.clamp(0.0, 1.0))


@pytest.mark.parametrize("scale", SUPPORTED_SCALES)
@pytest.mark.parametrize("name", TRAINABLE)
def test_one_adam_step_lowers_l1_loss(name: str, scale: int) -> None:
    g = build_generator(name, scale, **sample_options(name)).train()
    x = lr_batch()
    target = torch.rand(BATCH, 1, LR_H * scale, LR_W * scale)
    optimiser = torch.optim.Adam(g.parameters(), lr=1e-4)
    before = F.l1_loss(g(x), target)
    optimiser.zero_grad()
    before.backward()
    optimiser.step()
    with torch.no_grad():
        after = F.l1_loss(g(x), target)
    assert after.item() < before.item()


def test_bicubic_baseline_is_the_shared_operator() -> None:
    g = build_generator("bicubic", 4)
    assert count_parameters(g) == 0
    x = lr_batch()
    expected = F.interpolate(x, scale_factor=4, mode="bicubic", align_corners=False)
    torch.testing.assert_close(bicubic_upsample(x, 4), expected)
    torch.testing.assert_close(g.train()(x), expected)
    torch.testing.assert_close(g.eval()(x), expected.clamp(0, 1))
    flat = torch.full((1, 1, LR_H, LR_W), 0.3)
    torch.testing.assert_close(g(flat), torch.full((1, 1, 4 * LR_H, 4 * LR_W), 0.3))


def test_residual_cnn_refines_bicubic() -> None:
    g = build_generator("residual_cnn", 2)
    last = g.net[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(0.01)
    x = lr_batch()
    torch.testing.assert_close(g.train()(x), bicubic_upsample(x, 2) + 0.01)
    convs = [m for m in g.net if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 5 and sum(isinstance(m, torch.nn.ReLU) for m in g.net) == 4


def test_brainsr_scale_override_uses_the_shared_trunk() -> None:
    g = build_generator("brainsr", 4)
    assert g.scales == (2, 4)
    x = lr_batch()
    assert g(x).shape == (BATCH, 1, 4 * LR_H, 4 * LR_W)
    assert g(x, scale=2).shape == (BATCH, 1, 2 * LR_H, 2 * LR_W)
    with pytest.raises(ValueError):
        g(x, scale=3)
    assert build_generator("brainsr", 2).scales == (2,)


def test_generators_build_on_meta_device() -> None:
    # Building and running on the meta device fails on any tensor created on a fixed device.
    with torch.device("meta"):
        for name in MODEL_NAMES:
            g = build_generator(name, 2, **sample_options(name))
            y = g(torch.empty(BATCH, 1, LR_H, LR_W))
            assert y.device.type == "meta" and y.shape == (BATCH, 1, 2 * LR_H, 2 * LR_W)


# --------------------------------------------------------------------------- discriminators


@pytest.mark.parametrize("name", ADVERSARIAL)
def test_discriminator_any_patch_size(name: str) -> None:
    d = build_discriminator(name)
    conditional = model_spec(name).conditional_discriminator
    for size in [(32, 32), (48, 40)]:
        hr = torch.rand(BATCH, 1, *size)
        lr = torch.rand(BATCH, 1, size[0] // 4, size[1] // 4)
        for mode in ("train", "eval"):
            getattr(d, mode)()
            with torch.no_grad() if mode == "eval" else torch.enable_grad():
                logits = d(hr, lr) if conditional else d(hr)
            assert logits.shape == (BATCH, 1)
            assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ADVERSARIAL)
def test_discriminator_backward(name: str) -> None:
    d = build_discriminator(name, **sample_options(name, discriminator=True)).train()
    hr = torch.rand(BATCH, 1, 32, 32, requires_grad=True)
    args = (hr, torch.rand(BATCH, 1, 16, 16)) if model_spec(name).conditional_discriminator else (hr,)
    # Real and fake pass through before one backward, as a GAN step does (spectral norm's
    # power iteration must not break autograd).
    loss = d(*args).mean() - d(*args).mean() + d(*args).square().mean()
    loss.backward()
    assert hr.grad is not None and torch.isfinite(hr.grad).all()


def test_conditional_discriminator_sees_lr() -> None:
    d = build_discriminator("brainsr").eval()
    hr = torch.rand(BATCH, 1, 32, 32)
    with torch.no_grad():
        a = d(hr, torch.rand(BATCH, 1, 8, 8))
        b = d(hr, torch.rand(BATCH, 1, 8, 8))
        c = d(hr, torch.rand(BATCH, 1, 16, 16))  # x2 stage of the curriculum
    assert not torch.allclose(a, b)
    assert c.shape == (BATCH, 1)
    with pytest.raises(ValueError):
        d(hr, torch.rand(BATCH + 1, 1, 8, 8))


def test_blimsr_discriminator_is_spectrally_normalised() -> None:
    d = build_discriminator("blimsr", **sample_options("blimsr", discriminator=True))
    weighted = [m for m in d.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert weighted and all(hasattr(m, "parametrizations") and "weight" in m.parametrizations for m in weighted)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in d.modules())


# --------------------------------------------------------------------------- parameter counts


def test_espcn_x4_has_61840_parameters() -> None:
    assert count_parameters(build_generator("espcn", 4)) == 61_840


# --------------------------------------------------------------------------- input centring


@pytest.mark.parametrize("name", [n for n in MODEL_NAMES if n != "bicubic"])
def test_learned_branch_sees_the_centred_input(name: str) -> None:
    """The first convolution of every learned generator gets ``x - 0.5``: an uncentred ReLU
    network went dead on bright X-ray tiles (blocks module docstring)."""
    generator = build_generator(name, 2, **sample_options(name)).eval()
    first_inputs: list[torch.Tensor] = []
    hooks = [m.register_forward_pre_hook(lambda _m, args: first_inputs.append(args[0].detach().clone()))
             for m in generator.modules() if isinstance(m, torch.nn.Conv2d)]
    bright = torch.full((1, 1, 12, 12), 0.8)  # bicubic of a constant is that constant
    with torch.no_grad():
        generator(bright)
    for hook in hooks:
        hook.remove()
    # The published-weight architectures keep their published input range (x255) around the centred input.
    input_range = getattr(getattr(generator, "layout", None), "input_range", 1.0)
    torch.testing.assert_close(first_inputs[0], torch.full_like(first_inputs[0], 0.3 * input_range))


def test_checkpoint_layout_records_the_centring() -> None:
    """The centre is a buffer, so a checkpoint of an uncentred network fails to load."""
    generator = build_generator("espcn", 2)
    state = generator.state_dict()
    assert float(state["input_center"]) == 0.5
    del state["input_center"]
    with pytest.raises(RuntimeError, match="input_center"):
        build_generator("espcn", 2).load_state_dict(state)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_parameter_counts_match_docstring(name: str) -> None:
    documented = documented_counts(name)
    expected_keys = {f"generator x{s}" for s in SUPPORTED_SCALES}
    if model_spec(name).adversarial:
        expected_keys.add("discriminator")
    assert expected_keys <= documented.keys(), f"{name}: docstring lacks {expected_keys - documented.keys()}"
    module = model_module(name)
    for key, count in documented.items():
        sample = key.endswith(" sample")
        if key.startswith("generator"):
            scale = int(key.split()[1][1:])
            options = module.SAMPLE_OPTIONS if sample else {}
            actual = count_parameters(build_generator(name, scale, **options))
        else:
            options = module.DISCRIMINATOR_SAMPLE_OPTIONS if sample else {}
            actual = count_parameters(build_discriminator(name, **options))
        assert actual == count, f"{name} {key}: docstring says {count:,}, model has {actual:,}"


def test_parameter_budgets_of_the_seeds() -> None:
    # Reads the docstrings, which test_parameter_counts_match_docstring ties to the models.
    assert 150_000 < documented_counts("swift_srgan")["generator x4"] < 250_000  # "about 200k"
    assert 18_000_000 < documented_counts("blimsr")["generator x4"] < 20_000_000  # "about 19M"
    assert documented_counts("blimsr")["generator x4 sample"] < 500_000
    assert 100_000 < documented_counts("residual_cnn")["generator x2"] < 125_000  # "about 112k"


# --------------------------------------------------------------------------- curriculum


@pytest.mark.parametrize("target", SUPPORTED_SCALES)
def test_curriculum_is_monotone_and_ends_at_target(target: int) -> None:
    stages = [curriculum_stage(i / 100, target) for i in range(101)]
    scales = [s["scale"] for s in stages]
    strengths = [s["degradation_strength"] for s in stages]
    assert set(stages[0]) == {"scale", "degradation_strength"}
    assert all(a <= b for a, b in zip(scales, scales[1:]))
    assert all(a <= b for a, b in zip(strengths, strengths[1:]))
    assert set(scales) <= {2, target}
    assert all(0.0 <= s <= 1.0 for s in strengths)
    assert stages[0] == {"scale": 2, "degradation_strength": 0.0}
    assert stages[-1] == {"scale": target, "degradation_strength": 1.0}
    assert strengths[-1] > strengths[0]


@pytest.mark.parametrize("progress", [-0.1, 1.1, math.nan])
def test_curriculum_rejects_progress_outside_unit_interval(progress: float) -> None:
    with pytest.raises(ValueError):
        curriculum_stage(progress, 4)


def test_curriculum_rejects_unsupported_target() -> None:
    with pytest.raises(ValueError, match="supported scales"):
        curriculum_stage(0.5, 3)
